"""LoRA students: only the adapter trains, the teacher is untouched, saving writes an adapter, and
`horizon_opd.export.merge_adapter` folds it into a full model with the same logits."""

import math

import pytest
import torch
from testing_utils import logged, make_args
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from horizon_opd import HorizonOPDTrainer
from horizon_opd.export import merge_adapter


def _lora():
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _base_weights(peft_model) -> dict[str, torch.Tensor]:
    """The base model's weights under their original names (PEFT moves a wrapped layer's weight to `.base_layer`)."""
    state = peft_model.get_base_model().state_dict()
    return {k.replace(".base_layer", ""): v for k, v in state.items() if "lora_" not in k}


def _logits(model, tokenizer):
    ids = tokenizer(["3 + 4 = 7", "12 + 30 ="], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**ids).logits


@pytest.fixture
def student_path(tmp_path, student):
    """The student saved and reloaded, so the adapter records a base path it can be merged back onto."""
    student.save_pretrained(tmp_path / "student")
    return str(tmp_path / "student")


def test_lora_trains_only_the_adapter_and_saves_it(tmp_path, student_path, teacher, tokenizer, prompts):
    student = AutoModelForCausalLM.from_pretrained(student_path)
    base_before, teacher_before = _snapshot(student), _snapshot(teacher)
    trainer = HorizonOPDTrainer(model=student, teacher_model=teacher, train_dataset=prompts, processing_class=tokenizer,
                                args=make_args(tmp_path / "out", max_steps=3, learning_rate=1e-2, horizon="truncated",
                                               truncation_ratio=0.5),
                                peft_config=_lora())
    assert isinstance(trainer.model, PeftModel)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    trainer.train()
    assert all(math.isfinite(v) for v in logged(trainer, "loss"))

    base_after = _base_weights(trainer.model)
    assert base_after.keys() == base_before.keys()
    for name, weight in base_before.items():
        assert torch.equal(weight, base_after[name]), f"base weight {name} changed"
    lora_b = {n: p for n, p in trainer.model.named_parameters() if "lora_B" in n}
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b.values())  # LoRA B starts at zero: it trained
    teacher_after = trainer.accelerator.unwrap_model(trainer.teacher_model).state_dict()
    for name, weight in teacher_before.items():
        assert torch.equal(weight, teacher_after[name]), f"teacher weight {name} changed"

    trainer.save_model()
    saved = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= saved
    assert "model.safetensors" not in saved
    adapter = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)


def test_a_peft_model_passed_in_trains_its_own_adapter(tmp_path, student, teacher, tokenizer, prompts):
    peft_student = get_peft_model(student, _lora())
    base_before = _base_weights(peft_student)
    trainer = HorizonOPDTrainer(model=peft_student, teacher_model=teacher, args=make_args(tmp_path, max_steps=2,
                                learning_rate=1e-2), train_dataset=prompts, processing_class=tokenizer)
    trainer.train()
    for name, weight in _base_weights(trainer.model).items():
        assert torch.equal(weight, base_before[name]), name
    assert any(p.abs().sum() > 0 for n, p in trainer.model.named_parameters() if "lora_B" in n)


def test_merged_adapter_has_the_adapter_models_logits(tmp_path, student_path, teacher, tokenizer, prompts):
    trainer = HorizonOPDTrainer(model=student_path, teacher_model=teacher, train_dataset=prompts,
                                processing_class=tokenizer, peft_config=_lora(),
                                args=make_args(tmp_path / "out", max_steps=2, learning_rate=5e-2))
    trainer.train()
    trainer.save_model()
    adapter_model = trainer.model.eval()
    expected = _logits(adapter_model, tokenizer)
    assert not torch.allclose(expected, _logits(AutoModelForCausalLM.from_pretrained(student_path), tokenizer))

    # one call from the saved adapter directory to a standalone checkpoint
    merge_adapter(str(tmp_path / "out"), tmp_path / "merged", processing_class=tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not isinstance(merged, PeftModel) and not any("lora_" in n for n, _ in merged.named_parameters())
    assert (tmp_path / "merged" / "tokenizer.json").exists()
    torch.testing.assert_close(_logits(merged, tokenizer), expected, atol=1e-5, rtol=1e-5)
    # ...or from the PeftModel in memory
    torch.testing.assert_close(_logits(merge_adapter(adapter_model), tokenizer), expected, atol=1e-5, rtol=1e-5)


def test_peft_config_on_a_peft_model_names_the_fix(tmp_path, student, teacher, tokenizer, prompts):
    with pytest.raises(ValueError, match=r"already a PeftModel.*peft_config=None.*merge_adapter"):
        HorizonOPDTrainer(model=get_peft_model(student, _lora()), teacher_model=teacher, args=make_args(tmp_path),
                          train_dataset=prompts, processing_class=tokenizer, peft_config=_lora())
    with pytest.raises(TypeError, match=r"has no adapter to merge"):
        merge_adapter(student)


def test_adapter_card_links_hub_ids_but_never_local_paths(tmp_path):
    from horizon_opd.export import is_hub_id

    assert is_hub_id("Qwen/Qwen2.5-1.5B") and is_hub_id("gpt2")
    assert not is_hub_id(str(tmp_path)) and not is_hub_id("./student") and not is_hub_id("a/b/c")
