"""FSDP2 (`fully_shard`): the shipped examples/accelerate/fsdp2.yaml, the loss's handling of a sharded (DTensor) head,
and a 2-process training launch.

Under FSDP2 an `lm_head` weight is a DTensor outside its module's forward (always for the teacher, whose forward has
returned when the loss runs). TRL's kernels cannot mix it with plain hidden states: the loss turns it into a plain
tensor with `full_tensor()` (one all-gather; its backward reduce-scatters the gradient), as TRL's
`_chunked_divergence_loss` does.

The launch needs GPUs: accelerate 1.15 turns `distributed_type: FSDP` on only for multi-accelerator runs
(`AcceleratorState` sets FSDP when the backend type is MULTI_GPU/NPU/XPU/..., never MULTI_CPU), so on a CPU-only
machine an FSDP config silently trains plain DDP. `fully_shard` itself works on CPU with gloo, which the unit test uses.
"""

import socket

import pytest
import torch
import torch.distributed as dist
from accelerate.commands.config.config_args import load_config_from_file
from safetensors.torch import load_file
from testing_utils import ACCELERATE_CONFIGS, assert_ranks_agree, launch_training, save_launch_assets

from horizon_opd.teachers.local import vocab_slice


def test_shipped_fsdp2_config_loads():
    config = load_config_from_file(str(ACCELERATE_CONFIGS / "fsdp2.yaml"))
    assert config.distributed_type == "FSDP" and config.num_processes == 8 and config.mixed_precision == "bf16"
    assert config.fsdp_config["fsdp_version"] == 2
    assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"


@pytest.fixture
def one_process_group():
    """A gloo process group of one CPU process, for `fully_shard`; torn down so no other test sees it."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("vocab_size", [None, 7])
def test_a_sharded_head_reaches_the_kernels_as_a_plain_tensor(one_process_group, vocab_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    head = torch.nn.Linear(4, 10, bias=True)
    full_weight, full_bias = head.weight.detach().clone(), head.bias.detach().clone()
    fully_shard(head, mesh=init_device_mesh("cpu", (1,)))
    assert isinstance(head.weight, DTensor)  # what the loss sees outside the head's forward

    weight, bias = vocab_slice(head, vocab_size)
    rows = 10 if vocab_size is None else vocab_size
    assert not isinstance(weight, DTensor) and not isinstance(bias, DTensor)
    assert torch.equal(weight, full_weight[:rows]) and torch.equal(bias, full_bias[:rows])
    # the gradient still reaches the sharded parameters, padding rows excluded
    (weight.sum() + bias.sum()).backward()
    expected = torch.zeros(10)
    expected[:rows] = 1
    assert torch.equal(head.weight.grad.full_tensor(), expected[:, None].expand(10, 4))
    assert torch.equal(head.bias.grad.full_tensor(), expected)


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tokenizer):
    return save_launch_assets(tmp_path_factory.mktemp("fsdp"), len(tokenizer))


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason=(
    "FSDP launches need 2 GPUs: accelerate 1.15 enables FSDP only for multi-accelerator runs, so on CPU "
    "`distributed_type: FSDP` falls back to DDP (MULTI_CPU) and nothing would be sharded"))
def test_fsdp2_trains_with_a_padded_teacher_and_saves(assets):
    args = dict(max_steps=2, save_steps=2, horizon="progressive", progressive_schedule="stages",
                progressive_stage_ratios=[0.5, 1.0], progressive_stage_fractions=[0.0, 0.5], ddp_backend="nccl")
    ranks = launch_training(assets, "fsdp2", "fsdp2", "student", "teacher_padded", cpu=False, args=args)
    assert_ranks_agree(ranks, 2, [4, 8])
    for rank in ranks:
        assert rank["distributed_type"] == "FSDP" and rank["fsdp_version"] == 2
        assert rank["student_head_type"] == "DTensor"  # sharded outside forward: the loss must gather it
    checkpoint = assets / "fsdp2" / "out" / "checkpoint-2"
    saved = load_file(checkpoint / "model.safetensors")
    initial = load_file(assets / "student" / "model.safetensors")
    assert saved["lm_head.weight"].shape == initial["lm_head.weight"].shape  # the full head, not a shard
    assert not torch.equal(saved["lm_head.weight"], initial["lm_head.weight"])  # the student trained
