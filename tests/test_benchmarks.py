"""The benchmark scripts run end to end on tiny shapes, their bars are computed as documented, the step breakdown read
at public seams adds up to TRL's own step timer, the shared memory probe sees what a block allocates, and the CPU row
blocking of the loss (which the benchmarks motivated) gives exactly what one call of TRL's kernel gives."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

from horizon_opd import loss as loss_module
from horizon_opd.demo.measure import PeakRSS
from horizon_opd.horizon import ratio_to_tokens

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCHMARKS)
import report  # noqa: E402  (torch-free)
import run  # noqa: E402

BAR_NAMES = ["full_vs_trl_time", "full_vs_trl_memory", "truncated_0.1_speedup_vs_full", "truncated_0.1_token_fraction",
             "loss_memory_vs_gkd_152k_2048", "loss_memory_vs_trl_chunked_152k_2048", "overhead_fraction", "machine"]


def _child_env():
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    return env


# ------------------------------------------------------------------------------------------------ pure python
def _step(step, tokens, overhead_fraction=0.05, memory=100.0, horizon=512):
    median = {"step": step, "tokens": tokens, "overhead_fraction": overhead_fraction, "generation": step / 2}
    return {"median": median, "peak_memory_increase_mb": memory, "horizon_tokens": horizon}


def test_bars_are_the_documented_ratios():
    result = {
        "steps": {"trl_distillation": _step(10.0, 4096, memory=200.0), "full": _step(9.0, 4096, memory=150.0),
                  "truncated_0.1": _step(1.5, 416, overhead_fraction=0.08, horizon=52)},
        "loss": [{"impl": impl, "vocab": 151936, "length": 2048, "peak_memory_mb": mb}
                 for impl, mb in (("horizon", 900.0), ("trl_chunked", 3000.0), ("gkd", 12000.0))]
                + [{"impl": "horizon", "vocab": 32000, "length": 512, "peak_memory_mb": 1.0}],
        "machine": {"cpu": "test cpu", "cpu_count": 2},
    }
    bars, checks = report.bars(result)
    assert list(bars) == BAR_NAMES
    assert bars["full_vs_trl_time"] == pytest.approx(0.9)
    assert bars["full_vs_trl_memory"] == pytest.approx(0.75)
    assert bars["truncated_0.1_speedup_vs_full"] == pytest.approx(6.0)
    assert bars["truncated_0.1_token_fraction"] == pytest.approx(416 / 4096)
    assert bars["loss_memory_vs_gkd_152k_2048"] == pytest.approx(0.075)
    assert bars["loss_memory_vs_trl_chunked_152k_2048"] == pytest.approx(0.3)
    assert bars["overhead_fraction"] == pytest.approx(0.08)  # the worst HorizonOPDTrainer configuration
    assert "test cpu" in bars["machine"]
    assert all(checks[name]["pass"] for name in BAR_NAMES[:-1])
    result["steps"]["truncated_0.1"]["median"]["step"] = 3.0  # 3x: misses the 5x bar
    assert report.bars(result)[1]["truncated_0.1_speedup_vs_full"]["pass"] is False
    assert "FAIL" in report.markdown({**result, "bar_checks": report.bars(result)[1]})


def test_reports_print_no_lock_path_and_read_schema_1_results():
    assert report.public_command("python benchmarks/run.py --lock /tmp/x.lock --quick") == \
        "python benchmarks/run.py --lock FILE --quick"
    assert report.public_command("python benchmarks/gpu.py --lock=/a/b") == "python benchmarks/gpu.py --lock FILE"
    # schema 1 timed the loss forward and backward apart: its `loss` is the median of their per-step sums
    old = {"median": {"loss_forward": 1.0, "loss_backward": 2.0},
           "steps": [{"loss_forward": f, "loss_backward": b} for f, b in ((1.0, 2.0), (1.5, 2.0), (0.5, 1.0))]}
    assert report.step_median(old, "loss") == pytest.approx(3.0)
    assert report.step_median({"median": {"loss": 4.0}}, "loss") == 4.0


def test_peak_rss_sees_what_a_block_allocates_and_only_that():
    big = torch.ones(64 * 2**20 // 4)  # 64 MB, touched: resident before the probe starts
    with PeakRSS() as before:
        pass
    del big
    with PeakRSS() as memory:
        block = torch.ones(128 * 2**20 // 4)  # 128 MB, touched
        del block
    assert memory.peak >= memory.baseline + 120 and memory.increase == memory.peak - memory.baseline
    assert before.increase < 20  # an empty block allocates (almost) nothing
    assert memory.method  # says how the peak was read


def test_run_computes_horizons_as_the_library_does():
    for ratio in run.HORIZON_RATIOS.values():
        for L in (30, 32, 512):
            assert min(L, max(1, math.ceil(round(ratio * L, 9)))) == ratio_to_tokens(ratio, L)


def test_cpu_row_blocks_give_one_kernel_call_values_and_gradients():
    torch.manual_seed(0)
    N, H_s, H_t, V = 3 * loss_module.CPU_ROW_BLOCK + 17, 8, 12, 300
    h_s, w_s = torch.randn(N, H_s).requires_grad_(), (0.3 * torch.randn(V, H_s)).requires_grad_()
    h_t, w_t = torch.randn(N, H_t), 0.3 * torch.randn(V, H_t)
    b_s = (0.1 * torch.randn(V)).requires_grad_()
    weights = torch.rand(N)

    kl, entropy = loss_module.reverse_kl_per_token(h_s, w_s, h_t, w_t, temperature=0.7, student_bias=b_s,
                                                   student_post=(1.5, 30.0))
    grads = torch.autograd.grad((kl * weights).sum(), (h_s, w_s, b_s))
    ref_kl, ref_entropy = ChunkedDivergenceFunction.apply(h_s, w_s, b_s, h_t, w_t, None, 1.0, 0.7, 1.5, 30.0, 1.0,
                                                          None)
    ref_grads = torch.autograd.grad((ref_kl * weights).sum(), (h_s, w_s, b_s))
    torch.testing.assert_close(kl, ref_kl)
    torch.testing.assert_close(entropy, ref_entropy)
    for grad, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_quick_run_measures_every_configuration_and_writes_the_results(tmp_path):
    completed = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "run.py"), "--quick", "--out-dir",
                                str(tmp_path)], cwd=ROOT, env=_child_env(), capture_output=True, text=True,
                               timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    result = json.loads((tmp_path / "quick.json").read_text())
    assert (tmp_path / "quick.md").read_text().count("|") > 50
    assert (tmp_path / "quick.png").stat().st_size > 10_000

    assert set(result["steps"]) == set(run.STEP_CONFIGS)
    L = result["preset"]["max_completion_length"]
    horizons = {name: r["horizon_tokens"] for name, r in result["steps"].items()}
    assert horizons == {name: ratio_to_tokens(run.HORIZON_RATIOS[name], L) for name in run.STEP_CONFIGS}
    for name, r in result["steps"].items():
        m = r["median"]
        assert r["measured_steps"] == result["plan"]["steps"]
        assert all(m[k] > 0 for k in ("step", *report.SEGMENTS[:-1])), (name, m)  # every seam was reached
        if r["trainer"] != "trl.experimental.gkd.GKDTrainer":  # TRL's own `step_time` covers training_step
            inside = sum(m[k] for k in ("generation", "teacher_forward", "student_forward", "loss", "student_backward"))
            assert inside == pytest.approx(m["training_step"], rel=0.25, abs=0.005), (name, m)
        assert 0 < m["tokens"] <= result["preset"]["batch_size"] * r["horizon_tokens"]
        assert r["peak_memory_mb"] > 0
        assert set(r["horizons_seen"]) == {r["horizon_tokens"]}  # progressive stays in its stage
    assert {g["horizon"] for g in result["generate"]} == set(horizons.values())
    assert {(r["impl"], r["vocab"], r["length"]) for r in result["loss"]} == {
        (impl, v, k) for impl in run.LOSS_IMPLS for v in run.QUICK["loss_vocabs"] for k in run.QUICK["loss_lengths"]}
    for vocab, length in {(r["vocab"], r["length"]) for r in result["loss"]}:
        values = [r["loss"] for r in result["loss"] if (r["vocab"], r["length"]) == (vocab, length)]
        assert max(values) == pytest.approx(min(values), rel=1e-4)  # the three compute the same reverse KL

    assert list(result["bars"]) == BAR_NAMES
    for name in BAR_NAMES[:-1]:
        assert isinstance(result["bars"][name], float) and math.isfinite(result["bars"][name]), name
    assert result["bars"]["truncated_0.1_token_fraction"] <= 0.2
    assert result["errors"] == []


@pytest.mark.slow
def test_gpu_script_runs_its_cpu_path_on_tiny_shapes(tmp_path):
    completed = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "gpu.py"), "--tiny", "--lengths", "8", "16",
                                "--configs", "full", "truncated_0.1", "--steps", "1", "--out-dir", str(tmp_path)],
                               cwd=ROOT, env=_child_env(), capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_tiny.json").read_text())
    assert result["machine"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    runs = {(r["config"], r["L"]): r for r in result["runs"]}
    assert set(runs) == {(c, L) for c in ("full", "truncated_0.1") for L in (8, 16)}
    assert runs[("truncated_0.1", 16)]["horizon_tokens"] == 2 and runs[("full", 16)]["horizon_tokens"] == 16
    assert all(r["step_s"] > 0 and r["peak_memory_mb"] > 0 for r in result["runs"])
    assert (tmp_path / "gpu_tiny.md").exists() and (tmp_path / "gpu_tiny.png").exists()
