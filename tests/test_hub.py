"""`trainer.push_to_hub()` with the real `huggingface_hub` client against a fake Hub on 127.0.0.1 (tests/fake_hub.py):
which files arrive, what the model card says, for a full model and a LoRA adapter; and the missing-token error."""

import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import yaml
from fake_hub import FakeHub
from testing_utils import make_args

from horizon_opd import HorizonOPDTrainer

REPO_ROOT = Path(__file__).resolve().parents[1]
FAKE_TOKEN = "hf_horizonFakeTokenForTheLoopbackHub"
TAGS = {"trl", "horizon-opd", "on-policy-distillation", "distillation"}


def _card(files: dict[str, bytes]) -> tuple[dict, str]:
    text = files["README.md"].decode()
    _, front_matter, body = text.split("---\n", 2)
    return yaml.safe_load(front_matter), body


@pytest.fixture(scope="module")
def pushed(tmp_path_factory, tokenizer):
    """Run tests/hub_push_script.py (full model, then LoRA adapter) in a process pointed at the fake Hub."""
    from testing_utils import tiny_causal_lm

    root = tmp_path_factory.mktemp("hub")
    tiny_causal_lm(len(tokenizer), hidden_size=32, seed=0).save_pretrained(root / "student")
    tiny_causal_lm(len(tokenizer), hidden_size=48, seed=1).save_pretrained(root / "teacher")
    settings = root / "settings.json"
    settings.write_text(json.dumps({"student": str(root / "student"), "teacher": str(root / "teacher"),
                                    "output_root": str(root)}))
    drop = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HTTP_PROXY", "HTTPS_PROXY",
            "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy")
    with FakeHub() as hub:
        env = {k: v for k, v in os.environ.items() if k not in drop}
        env.update(HF_ENDPOINT=hub.url, HF_TOKEN=FAKE_TOKEN, HF_HUB_DISABLE_XET="1", HF_HOME=str(root / "hf_home"),
                   HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="127.0.0.1,localhost", PYTHONPATH=str(REPO_ROOT),
                   HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        run = subprocess.run([sys.executable, str(Path(__file__).parent / "hub_push_script.py"), str(settings)],
                             env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    results = json.loads((root / "push_results.json").read_text())
    return hub, results


def test_full_model_push_uploads_the_checkpoint_with_a_descriptive_card(pushed):
    hub, results = pushed
    assert hub.unhandled == []
    repo = hub.repos["horizon-tester/distilled-full"]
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "README.md", "training_args.bin"} <= set(repo)
    assert not any(path.startswith(("checkpoint-", "_")) for path in repo)
    # the weights went through the LFS path, byte for byte what the trainer saved
    assert any(method == "PUT" and path.startswith("/lfs-objects/") for method, path, _ in hub.requests)
    local = Path(results["full"]["output_dir"])
    assert repo["model.safetensors"] == (local / "model.safetensors").read_bytes()
    # every write was authenticated with the user's token
    writes = [auth for method, path, auth in hub.requests if method == "POST" and "/commit/" in path]
    assert writes and all(auth == f"Bearer {FAKE_TOKEN}" for auth in writes)

    meta, body = _card(repo)
    assert meta["base_model"] == "horizon-tester/tiny-student"
    assert meta["datasets"] == ["horizon-tester/sums"] or meta["datasets"] == "horizon-tester/sums"
    assert TAGS <= set(meta["tags"])
    assert meta["library_name"] == "transformers"
    assert "| Teacher | [horizon-tester/tiny-teacher](https://huggingface.co/horizon-tester/tiny-teacher) |" in body
    assert "`truncated` (TOPD): every rollout stops at ceil(rho * L) = 4 tokens" in body
    assert "`truncation_ratio` = 0.5 and L = 8" in body
    assert "`reverse_kl`: exact token-level reverse KL(student ‖ teacher)" in body
    assert "[horizon-tester/sums](https://huggingface.co/datasets/horizon-tester/sums)" in body
    assert "### Training metrics" in body and "| reverse KL (last logged step) |" in body
    assert "| horizon (tokens, last logged step) | 4 |" in body
    # TRL's template: the method's paper and both citations
    assert "https://huggingface.co/papers/2605.31490" in body
    assert "eprint       = {arXiv:2605.31490}" in body and "@software{vonwerra2020trl" in body


def test_lora_push_uploads_an_adapter_card_for_its_base(pushed):
    hub, results = pushed
    repo = hub.repos["horizon-tester/distilled-lora"]
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(repo)
    assert "model.safetensors" not in repo  # the adapter, not a full copy of the base
    assert json.loads(repo["adapter_config.json"])["base_model_name_or_path"] == "horizon-tester/tiny-student"
    meta, body = _card(repo)
    assert meta["library_name"] == "peft"
    assert meta["base_model"] == "horizon-tester/tiny-student"
    assert {"lora", "base_model:adapter:horizon-tester/tiny-student"} | TAGS <= set(meta["tags"])
    assert "| Adapter | LoRA (r = 4, alpha = 8, target modules ['q_proj', 'v_proj'])" in body
    assert "horizon_opd.export.merge_adapter" in body
    assert "| Teacher | [horizon-tester/tiny-teacher]" in body


def test_trl_model_card_seams_we_rely_on():
    import inspect

    from transformers import Trainer
    from trl import DistillationTrainer

    params = list(inspect.signature(DistillationTrainer.create_model_card).parameters)
    assert params == ["self", "model_name", "dataset_name", "tags"]
    assert "self.create_model_card(model_name=model_name, **kwargs)" in inspect.getsource(Trainer.push_to_hub)
    assert "### Framework versions" in (Path(inspect.getfile(DistillationTrainer)).parents[1] / "templates" /
                                        "lm_model_card.md").read_text()


def test_push_without_a_token_names_the_fix(tmp_path, monkeypatch, student, teacher, tokenizer, prompts):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-login"))
    with pytest.raises(ValueError, match=r"needs a token with write access.*hf auth login.*HF_TOKEN=hf_.*hub_token"):
        HorizonOPDTrainer(model=student, teacher_model=teacher, train_dataset=prompts, processing_class=tokenizer,
                          args=make_args(tmp_path, push_to_hub=True, hub_model_id="someone/distilled"))
    trainer = HorizonOPDTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path), train_dataset=prompts,
                                processing_class=tokenizer)
    with pytest.raises(ValueError, match=r"hf auth login"):
        trainer.push_to_hub()
