"""Fail loudly if a TRL method or attribute HorizonOPDTrainer relies on changes (we pin trl 1.16.x)."""

import inspect

import trl
from packaging.version import Version
from trl import DistillationConfig, DistillationTrainer
from trl.generation.vllm_generation import VLLMGeneration
from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
from trl.kernels.chunked_logprob import ChunkedLogProbFunction

from horizon_opd import HorizonOPDConfig, HorizonOPDTrainer


def test_trl_version_is_the_tested_one():
    assert Version("1.16.0") <= Version(trl.__version__) < Version("1.17.0"), trl.__version__


def test_overridden_methods_keep_their_signatures():
    expected = {
        "_generate_single_turn": ["self", "prompt_ids", "images", "multimodal_fields", "has_tool_images"],
        "_compute_loss": ["self", "unwrapped_student", "inputs", "num_items_in_batch"],
        "compute_loss": ["self", "model", "inputs", "return_outputs", "num_items_in_batch"],
        "training_step": ["self", "model", "inputs", "num_items_in_batch"],
        "log": ["self", "logs", "start_time"],
        "_save_checkpoint": ["self", "model", "trial"],
        "_get_last_hidden_state": ["self", "unwrapped_model", "input_ids", "attention_mask", "logits_to_keep"],
        "_generate_and_score_completions": ["self", "inputs"],
    }
    for name, params in expected.items():
        actual = list(inspect.signature(getattr(DistillationTrainer, name)).parameters)
        assert actual[: len(params)] == params, (name, actual)
        assert name in vars(DistillationTrainer), name
    assert issubclass(HorizonOPDTrainer, DistillationTrainer)
    assert issubclass(HorizonOPDConfig, DistillationConfig)


def test_generation_horizon_enters_where_we_set_it():
    source = inspect.getsource(DistillationTrainer._generate_single_turn)
    # transformers path: generate() reads self.generation_config; unwrap reads self.generation_kwargs
    assert "generation_config=self.generation_config" in source
    assert "generation_kwargs=self.generation_kwargs" in source
    init = inspect.getsource(DistillationTrainer.__init__)
    assert '"max_new_tokens": self.max_completion_length' in init
    # vLLM path: the per-call sampling parameters read the generator's attribute
    assert "max_completion_length = self.max_completion_length" in inspect.getsource(VLLMGeneration)
    # the teacher may be attached by a subclass
    assert "teacher_model is not None" in init


def test_compute_loss_routes_our_loss_and_reads_generated_token_counts():
    source = inspect.getsource(DistillationTrainer.compute_loss)
    assert "self._compute_loss" in source
    assert 'inputs["num_items_in_batch"]' in source
    assert "loss, entropy_sum, num_valid_tokens" in source


def test_kernel_signatures():
    div = list(inspect.signature(ChunkedDivergenceFunction.forward).parameters)
    assert div[1:8] == ["student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight",
                        "teacher_bias", "beta"]
    lp = list(inspect.signature(ChunkedLogProbFunction.forward).parameters)
    assert lp[1:10] == ["hidden", "weight", "bias", "targets", "temperature", "chunk_size", "final_logit_softcapping",
                        "logit_scale", "outputs"]


def test_metrics_and_model_card_hooks_exist():
    for attr in ("_tag_names", "_name", "_paper", "create_model_card"):
        assert hasattr(DistillationTrainer, attr)
    assert "completions/clipped_ratio" in inspect.getsource(DistillationTrainer._generate)


def test_multimodal_keys_equal_trls_local_tuple():
    """TRL keeps the tuple local to `_compute_loss`, so we copy it; this pins the copy."""
    import ast

    from horizon_opd.trainer import MULTIMODAL_KEYS

    tree = ast.parse(inspect.getsource(DistillationTrainer._compute_loss).strip().replace("\n    ", "\n"))
    tuples = [node for node in ast.walk(tree) if isinstance(node, ast.Assign)
              and any(getattr(t, "id", None) == "multimodal_keys" for t in node.targets)]
    assert len(tuples) == 1
    assert tuple(ast.literal_eval(tuples[0].value)) == MULTIMODAL_KEYS


def test_end_of_step_is_where_trl_counts_it():
    """`HorizonOPDTrainer.training_step` closes a step on TRL's own condition: TRL increments `_step` in
    `training_step` and closes its step timer on `_step % current_gradient_accumulation_steps == 0`."""
    source = inspect.getsource(DistillationTrainer.training_step)
    assert "self._step += 1" in source
    assert "self._step % self.current_gradient_accumulation_steps == 0" in source


def test_checkpoint_state_rides_in_trainer_state():
    """The horizon state is stored in `state.stateful_callbacks`, which transformers writes to trainer_state.json at
    save and reads back on resume without needing a callback of that name."""
    from transformers import Trainer, TrainerState

    assert "self.state.save_to_json" in inspect.getsource(Trainer._save_checkpoint)
    state = TrainerState(stateful_callbacks={"HorizonOPDTrainer": {"args": {}, "attributes": {"x": 1}}})
    assert state.stateful_callbacks["HorizonOPDTrainer"]["attributes"] == {"x": 1}
