"""LoRA (`peft_config`) under DeepSpeed ZeRO-2 and ZeRO-3: two CPU processes train an adapter for real with the shipped
configs (tests/distributed/ds_train_script.py). On every rank only the adapter changes (full values, gathered under
ZeRO-3), the teacher and the student's padded vocabulary rows stay as they were, and the saved adapter merges
(`horizon_opd.export.merge_adapter`) into a model with the trained model's logits. About 12-15 s per launch here."""

import pytest
import torch
from safetensors.torch import load_file
from testing_utils import assert_ranks_agree, launch_training, save_launch_assets

from horizon_opd.export import merge_adapter

# the input ds_train_script.py computes the trained student's logits on
LOGITS_INPUT = [[5, 6, 7, 8, 9, 10, 11, 12]]
LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tokenizer):
    return save_launch_assets(tmp_path_factory.mktemp("ds_lora"), len(tokenizer))


@pytest.mark.slow
@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_lora_under_zero_trains_only_the_adapter_and_merges_to_the_same_logits(assets, tokenizer, config):
    # the student's head is padded 25 rows past the tokenizer; the teacher's is not
    args = dict(max_steps=2, save_strategy="no", horizon="truncated", truncation_ratio=0.5)
    ranks = launch_training(assets, f"lora_{config}", config, "student_padded", "teacher", args=args, lora=LORA,
                            record_weights=True)
    assert_ranks_agree(ranks, 2, [4, 4])
    for rank in ranks:
        assert rank["zero_stage"] == int(config[-1])
        adapter = [n for n in rank["student_changed"] + rank["student_unchanged"] if "lora_" in n]
        assert len(adapter) == 2 * 2 * 2  # 2 layers x (q_proj, v_proj) x (lora_A, lora_B)
        assert sorted(rank["student_changed"]) == sorted(adapter)  # every adapter weight trained, nothing else
        assert any("lm_head" in n for n in rank["student_unchanged"])  # padded rows included
        assert rank["teacher_changed"] == []
    # both ranks hold the same trained student
    assert ranks[0]["student_checksums"] == ranks[1]["student_checksums"]

    out = assets / f"lora_{config}" / "out"
    saved = load_file(out / "adapter_model.safetensors")
    assert saved and all("lora_" in key for key in saved)
    merged = merge_adapter(str(out)).eval()
    with torch.no_grad():
        logits = merged(input_ids=torch.tensor(LOGITS_INPUT)).logits
    for rank in ranks:
        torch.testing.assert_close(logits, torch.tensor(rank["logits"]), rtol=0, atol=1e-5)
    # the merged head is the base head, padding rows included
    base = load_file(assets / "student_padded" / "model.safetensors")["lm_head.weight"]
    assert merged.lm_head.weight.shape[0] == len(tokenizer) + 25
    assert torch.equal(merged.lm_head.weight, base)
