"""The benchmark scripts run end to end on tiny shapes, their bars are computed as documented, the step breakdown read
at public seams adds up to TRL's own step timer, the shared memory probe sees what a block allocates, and the CPU row
blocking of the loss (which the benchmarks motivated) gives exactly what one call of TRL's kernel gives."""

import dataclasses
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
import common  # noqa: E402
import gpu_model  # noqa: E402  (torch-free)
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


# ------------------------------------------------------------------------------------------------ GPU cost model
EXACT = gpu_model.Assumptions(bandwidth_efficiency=1.0, mfu=1.0, decode_floor_s=0.0, optimizer_bytes_per_param=0.0)
H100 = gpu_model.GPUS["H100"]


def test_cost_model_rates_match_hand_computed_values():
    # 1e9 parameters x 2 bytes streamed at 3.35e12 B/s: 0.597 ms, the memory-bound floor of one decode iteration
    assert gpu_model.weights_read_seconds(1e9, 2, 3.35e12, 1.0) == pytest.approx(0.597e-3, abs=1e-6)
    assert gpu_model.weights_read_seconds(1e9, 2, 3.35e12, 0.5) == pytest.approx(1.194e-3, abs=1e-6)
    model = gpu_model.Model("1B", backbone_params=900_000_000, head_params=100_000_000, kv_bytes_per_token=100_000)
    assert model.params == 10**9 and model.weight_bytes == 2 * 10**9
    # FLOPs: 2 per parameter per token forward, 6 forward + backward; the head only over its own tokens
    assert gpu_model.forward_flops(model, 1000, 0) == 2 * 900e6 * 1000
    assert gpu_model.forward_flops(model, 1000, 10) == 2 * (900e6 * 1000 + 100e6 * 10)
    assert gpu_model.train_flops(model, 1000, 1000) == 6e12
    assert gpu_model.compute_seconds(6e12, 989e12, 0.4) == pytest.approx(6e12 / 395.6e12)
    rates = gpu_model.Rates(H100, EXACT)
    # one iteration at batch 8, context 1000: (2e9 weight bytes + 8 x 1000 x 1e5 KV bytes) / 3.35e12 = 0.836 ms,
    # above the batch's compute (8 x 2e9 FLOPs / 989e12 = 16 us)
    a, b, floor = rates.decode_line(model, 8)
    assert a + b * 1000 == pytest.approx(2.8e9 / 3.35e12)
    assert floor == pytest.approx(16e9 / 989e12)
    assert rates.decode_seconds(model, 8, 1000, 1) == pytest.approx(2.8e9 / 3.35e12)
    # 10 iterations from context 1000: the mean context is 1004.5
    assert rates.decode_seconds(model, 8, 1000, 10) == pytest.approx(10 * (2e9 + 8 * 1004.5 * 1e5) / 3.35e12)
    # a launch-bound floor (transformers' eager generate) hides the memory time under it
    slow = gpu_model.Rates(H100, dataclasses.replace(EXACT, decode_floor_s=0.02))
    assert slow.decode_seconds(model, 8, 1000, 10) == pytest.approx(0.2)
    # compute-bound past a large enough batch: 1024 x 2e9 FLOPs / 989e12 = 2.07 ms > (2e9 + 1024 x 1e3 x 1e5) B
    a, b, floor = rates.decode_line(model, 1024)
    assert floor == pytest.approx(1024 * 2e9 / 989e12) and floor > a + b * 10


def test_decode_sum_is_the_sum_of_its_terms():
    for a, b, floor, start, n in [(1.0, 0.5, 0.0, 0, 7), (1.0, 0.5, 3.0, 0, 9), (1.0, 0.5, 3.0, 2, 9),
                                  (0.2, 0.1, 5.0, 3, 40), (2.0, 0.0, 1.0, 5, 4), (0.0, 0.0, 1.0, 5, 4),
                                  (1e-3, 1e-7, 2e-3, 256, 1024), (1.0, 0.5, 3.0, 0, 0)]:
        brute = sum(max(a + b * (start + i), floor) for i in range(n))
        assert gpu_model.decode_sum(a, b, floor, start, n) == pytest.approx(brute, rel=1e-12, abs=1e-12)


def test_cost_model_counts_what_each_method_processes():
    # OPD/TOPD-like step: 2 rollouts, 10 prompt tokens, 5 generated
    s = gpu_model.standard_step(2, 10, 5)
    assert (s.decode_iterations, s.decode_start_context, s.generated_tokens, s.trained_positions) == (5, 10, 10, 10)
    assert (s.prefill_tokens, s.student_context_tokens, s.student_train_tokens, s.teacher_tokens) == (20, 0, 30, 30)
    # rolling, L = 10, rho = 0.3: chunks of 3 at depths 0, 3, 6, 9 (the last one 1 token), as built: both cached
    cycle = gpu_model.rolling_cycle(1, 10, 10, 0.3)
    assert [c.decode_iterations for c in cycle] == [3, 3, 3, 1]
    assert [c.decode_start_context for c in cycle] == [10, 13, 16, 19]
    assert [c.prefill_tokens for c in cycle] == [10, 13, 16, 19]  # the context encoded once, for generation
    assert all(c.student_context_tokens == 0 for c in cycle)  # the loss reads generation's keys and values
    assert [c.student_train_tokens for c in cycle] == [4, 4, 4, 2]  # gradients through the last token + the chunk
    assert [c.teacher_tokens for c in cycle] == [13, 4, 4, 2]  # prompt + chunk at depth 0, then chunk + 1
    assert sum(c.trained_positions for c in cycle) == 10  # every position trained once per rollout
    teacher_only = gpu_model.rolling_cycle(1, 10, 10, 0.3, cache="teacher")  # vLLM generation
    assert [c.student_context_tokens for c in teacher_only] == [9, 12, 15, 18]  # the context but its last token
    assert [c.teacher_tokens for c in teacher_only] == [13, 4, 4, 2]
    uncached = gpu_model.rolling_cycle(1, 10, 10, 0.3, cache="none")
    assert [c.teacher_tokens for c in uncached] == [13, 16, 19, 20]  # the teacher over context + chunk
    # 32 slots of a 256-token prompt, chunk 103: 32 x 359 teacher tokens at depth 0, 32 x 104 at depth 412
    assert gpu_model.rolling_step(32, 256, 0, 103).teacher_tokens == 32 * 359 == 11_488
    assert gpu_model.rolling_step(32, 256, 412, 103).teacher_tokens == 32 * 104 == 3_328
    assert gpu_model.rolling_step(32, 256, 412, 103, cache="none").teacher_tokens == 32 * (668 + 103)
    # the student memory: a slot's prompt in generation's prefill when it starts, then only its context's last token
    assert gpu_model.rolling_step(32, 256, 0, 103, cache="memory").prefill_tokens == 32 * 256
    memory = gpu_model.rolling_step(32, 256, 412, 103, cache="memory")
    assert (memory.prefill_tokens, memory.student_context_tokens) == (32, 0)
    assert memory.decode_start_context == 668 and memory.teacher_tokens == 32 * 104  # decode still reads the context
    grad = gpu_model.rolling_step(32, 256, 412, 103, cache="grad")  # rolling_context_grad: context + chunk with grad
    assert (grad.student_train_tokens, grad.student_context_tokens, grad.prefill_tokens) == (32 * 771, 0, 32 * 668)
    with pytest.raises(ValueError, match="cache='student'"):
        gpu_model.rolling_step(1, 10, 0, 3, cache="student")
    # the wide methods' prompts: ceil(B / rho), as the demo's `<method>-wide<rho>` (320 at B = 32, 40 at B = 4)
    assert [gpu_model.wide_batch(b, 0.1) for b in (32, 4, 64, 1)] == [320, 40, 640, 10]
    assert gpu_model.wide_batch(3, 0.3) == 10 and gpu_model.wide_batch(3, 0.25) == 12
    # one step's seconds, term by term, at exact rates (efficiency 1, MFU 1) and a KV-free model
    model = gpu_model.Model("m", backbone_params=900_000_000, head_params=100_000_000, kv_bytes_per_token=0)
    seconds = gpu_model.step_seconds(s, model, model, gpu_model.Rates(H100, EXACT))
    assert seconds["decode"] == pytest.approx(5 * 2e9 / 3.35e12)
    assert seconds["prefill"] == pytest.approx(2 * 900e6 * 20 / 989e12)
    assert seconds["student_context"] == 0
    assert seconds["student_train"] == pytest.approx(6 * (900e6 * 30 + 100e6 * 10) / 989e12)
    assert seconds["teacher"] == pytest.approx(2 * (900e6 * 30 + 100e6 * 10) / 989e12)
    assert seconds["step"] == pytest.approx(sum(v for k, v in seconds.items() if k != "step"))


def test_cost_model_methods_follow_the_library_horizons():
    rows = {m.name: m for m in gpu_model.methods(batch=4, prompt=32, length=1024, rho=0.1, steps=100)}
    assert {s.decode_iterations for s in rows["OPD"].shapes} == {1024}
    assert {s.decode_iterations for s in rows["TOPD rho=0.1"].shapes} == {ratio_to_tokens(0.1, 1024)} == {103}
    anchored = [s.decode_iterations for s in rows["Anchored rho=0.1 every 10"].shapes]
    assert sum(anchored) == 10 * 1024 + 90 * 103
    popd = [s.decode_iterations for s in rows["POPD linear 0.1->1"].shapes]
    assert popd[0] == 103 and popd[-1] == 1024 and popd == sorted(popd)
    rolling = rows["Rolling rho=0.1"].shapes  # 10 chunks: 9 of 103, the last of 97; mean depth 4.5 x 103
    assert [s.decode_iterations for s in rolling] == [103] * 9 + [97]
    assert sum(s.decode_start_context - 32 for s in rolling) / len(rolling) == pytest.approx(4.5 * 103)
    # wide: ceil(4 / 0.1) = 40 prompts or slots, OPD's trained tokens per update (4 x 1024) in 103 decode iterations
    topd_wide = rows["TOPD rho=0.1 wide"].shapes
    assert [(s.batch, s.decode_iterations, s.trained_positions) for s in topd_wide] == [(40, 103, 40 * 103)]
    wide = rows["Rolling rho=0.1 wide"].shapes
    assert {s.batch for s in wide} == {40} and sum(s.trained_positions for s in wide) / len(wide) == 4 * 1024
    assert [s.teacher_tokens for s in wide] == [40 * (32 + 103)] + [40 * 104] * 8 + [40 * 98]
    uncached = rows["Rolling rho=0.1 wide, uncached"].shapes
    assert [s.teacher_tokens for s in uncached] == [40 * (32 + d + min(103, 1024 - d)) for d in range(0, 1024, 103)]
    assert {s.student_context_tokens for s in rows["Rolling rho=0.1 wide, teacher cache only"].shapes} != {0}
    memory = rows["Rolling rho=0.1 wide, student memory"].shapes
    assert [s.prefill_tokens for s in memory] == [40 * 32] + [40] * 9
    if os.path.exists(gpu_model.DEMO_RESULTS):  # the adaptive schedule is the demo's, measured
        adaptive = [s.decode_iterations for s in rows["Adaptive 0.1-1"].shapes]
        assert set(adaptive) >= {103, 1024}


def test_cost_model_prices_the_wide_batch_and_its_caches():
    rates = gpu_model.Rates(H100, EXACT)
    student, teacher = gpu_model.STUDENT, gpu_model.TEACHER
    # decode reads every slot's KV each iteration: TOPD wide's 103 iterations at batch 640, not 64
    topd_wide = gpu_model.standard_step(640, 256, 103)
    assert gpu_model.step_seconds(topd_wide, student, teacher, rates)["decode"] == pytest.approx(
        rates.decode_seconds(student, 640, 256, 103))
    assert rates.decode_line(student, 640)[1] == pytest.approx(10 * rates.decode_line(student, 64)[1])
    # per-token KV bytes: layers x 2 x kv_heads x head_dim x 2 bytes (bf16)
    assert teacher.kv_bytes_per_token == 28 * 2 * 4 * 128 * 2 == 57_344
    assert student.kv_bytes_per_token == 28 * 2 * 2 * 128 * 2 == 28_672
    # the wide rolling teacher cache: 40 slots x the mean tokens held (prompt + depth + chunk) over the cycle
    memory = {(r["method"], r["cache"]): r for r in gpu_model.cache_memory(gpu_model.Scenario(batch=4, prompt=32))}
    held = 32 + (103 * (1 + 2 + 3 + 4 + 5 + 6 + 7 + 8 + 9) + 1024) / 10  # 597.9
    cache = memory["Rolling rho=0.1 wide", "teacher, kept across steps"]
    assert (cache["slots"], cache["peak_tokens_per_slot"]) == (40, 32 + 1024)
    assert cache["tokens_per_slot"] == pytest.approx(held)
    assert cache["bytes"] == pytest.approx(40 * held * 57_344)
    assert memory["TOPD rho=0.1 wide", "student, in generate"]["bytes"] == 40 * (32 + 103) * 28_672


def test_cost_model_prices_measured_counts_and_reads_older_files(tmp_path):
    settings = {"max_completion_length": 10, "batch_size": 2}
    counted = {"prompts_started": 4, "prefill_tokens": 40, "student_nograd_tokens": 0, "student_grad_tokens": 60,
               "teacher_tokens": 60}
    runs = [{"name": "OPD", "batch_size": 2, "horizons": [10, 10], "decode_iterations": 20, "tokens_generated": 40,
             "trained_tokens": 40, "counts": counted},
            {"name": "Rolling rho=0.1 wide", "batch_size": 20, "horizons": [1, 1], "decode_iterations": 2,
             "tokens_generated": 40, "trained_tokens": 40,
             "counts": {"prompts_started": 20, "prefill_tokens": 440, "student_nograd_tokens": 400,
                        "student_grad_tokens": 80, "teacher_tokens": 260}},
            {"name": "TOPD rho=0.1", "batch_size": 2, "horizons": [1, 1], "decode_iterations": 2,
             "tokens_generated": 4, "trained_tokens": 4}]  # an older record: no "counts"
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"settings": settings, "methods": runs}))
    model = gpu_model.Model("m", backbone_params=900_000_000, head_params=100_000_000, kv_bytes_per_token=0)
    lines, rows = gpu_model.measured_counts(str(path), str(tmp_path / "absent.json"),
                                            priced=(model, model, gpu_model.Rates(H100, EXACT)))
    by = {r["method"]: r for r in rows}
    wide = by["Rolling rho=0.1 wide"]  # per step: the files' totals over 2 steps
    assert (wide["prefill_tokens"], wide["student_nograd_tokens"], wide["student_grad_tokens"],
            wide["teacher_tokens"], wide["prompts_started"]) == (220, 200, 40, 130, 10)
    assert set(gpu_model.MEASURED_COUNTS) <= set(wide["measured"])
    shape = gpu_model.measured_shape(wide)  # every count measured; decoding from the mean context 220 / 20
    assert (shape.batch, shape.decode_iterations, shape.decode_start_context, shape.teacher_tokens) == (20, 1, 11, 130)
    assert wide["seconds_per_trained"] == pytest.approx(gpu_model.step_seconds(shape, model, model, gpu_model.Rates(
        H100, EXACT))["step"] / 20)
    assert wide["vs_opd"] == pytest.approx(wide["seconds_per_trained"] / by["OPD"]["seconds_per_trained"])
    old = by["TOPD rho=0.1"]  # an older record is listed, unpriced
    assert old["teacher_tokens"] is None and old["seconds_per_trained"] is None
    assert not set(gpu_model.MEASURED_COUNTS) & set(old["measured"])
    assert any("| TOPD rho=0.1 |" in line and line.endswith("| – |") for line in lines)


def test_cost_model_reads_measured_rates():
    model = gpu_model.Model("m", backbone_params=900_000_000, head_params=100_000_000, kv_bytes_per_token=0)
    measured = {"device": "NVIDIA H200", "decode": [
        {"batch": 1, "context": 200, "seconds_per_iteration": 0.020},
        {"batch": 65, "context": 200, "seconds_per_iteration": 0.030}],
        "compute": {"teacher_forward": {"flops": 4e14, "seconds": 1.0}}}
    rates = gpu_model.Rates(gpu_model.gpu_for(measured["device"]), EXACT, measured)
    assert rates.gpu.name == "H200 SXM"
    assert rates.decode_seconds(model, 33, 200, 10) == pytest.approx(10 * 0.025)  # interpolated in batch
    assert rates.decode_seconds(model, 129, 200, 1) == pytest.approx(0.040)  # extrapolated
    assert rates.flops_seconds(8e14, "teacher_forward") == pytest.approx(2.0)  # 400 TFLOP/s measured
    assert rates.flops_seconds(989e12, "student_forward") == pytest.approx(1.0)  # not measured: peak x MFU (1 here)
    assert "measured" in rates.sources()["decode"] and "assumed" in rates.sources()["student_forward"]


def test_cost_model_tables_and_its_checks():
    # The Qwen2.5 shapes' totals (the model cards' 1.54B and 7.61B): 1.5B tied, 7B with an untied input embedding
    assert gpu_model.STUDENT.params == 1_543_714_304
    assert gpu_model.TEACHER.params + gpu_model.TEACHER.head_params == 7_615_616_512
    text, payload = gpu_model.report(gpu_model.Scenario(), lengths=(1024, 4096))
    for piece in ("| OPD |", "| TOPD rho=0.1 |", "| Rolling rho=0.1 |", "| Rolling rho=0.1 wide |", "**L = 4096.**",
                  "teacher, kept across steps", "ESR", "assumed"):
        assert piece in text
    assert [t["length"] for t in payload["tables"]] == [1024, 4096]
    for table in payload["tables"]:
        for rows in table["columns"].values():
            by = {r["method"]: r for r in rows}
            assert by["TOPD rho=0.1"]["step"] < by["OPD"]["step"] and by["Rolling rho=0.1"]["step"] < by["OPD"]["step"]
            assert by["Rolling rho=0.1"]["decode_iterations"] <= by["TOPD rho=0.1"]["decode_iterations"]
            # wide: OPD's trained positions in TOPD's decode iterations; the teacher's cache changes its term only,
            # the student's (generation's keys and values for the loss) its context term only
            wide, teacher_only = by["Rolling rho=0.1 wide"], by["Rolling rho=0.1 wide, teacher cache only"]
            uncached = by["Rolling rho=0.1 wide, uncached"]
            assert wide["trained_positions"] == by["OPD"]["trained_positions"]
            chunk = gpu_model.ratio_to_tokens(0.1, table["length"])
            assert wide["decode_iterations"] <= by["TOPD rho=0.1 wide"]["decode_iterations"] == chunk
            assert teacher_only["teacher"] < uncached["teacher"] and teacher_only["step"] - teacher_only[
                "teacher"] == pytest.approx(uncached["step"] - uncached["teacher"])
            assert wide["student_context"] == 0 < teacher_only["student_context"]
            assert wide["step"] - wide["student_context"] == pytest.approx(
                teacher_only["step"] - teacher_only["student_context"])
    # the model's step cost is about linear in the horizon: it cannot produce ESR's 24x for 10x the tokens
    assert all(r["ratio"] < 13 for r in payload["esr"])
    if "cpu_check" in payload:  # measured: on the CPU, step time follows tokens (TOPD 0.1: 0.102 of full's)
        truncated = next(r for r in payload["cpu_check"] if r["config"] == "truncated_0.1")
        assert truncated["step"] == pytest.approx(truncated["tokens"], abs=0.02)


def test_gpu_script_without_cuda_says_so_in_one_line():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    completed = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "gpu.py")], cwd=ROOT, env=_child_env(),
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2
    assert completed.stderr.strip().count("\n") == 0 and "no CUDA device" in completed.stderr
    assert completed.stdout == ""


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
        # every seam was reached; only rolling rollouts run the student over a context without grad
        reached = [k for k in ("step", *report.SEGMENTS[:-1]) if k != "student_context" or name.startswith("rolling")]
        assert all(m[k] > 0 for k in reached), (name, m)
        if r["trainer"] != "trl.experimental.gkd.GKDTrainer":  # TRL's own `step_time` covers training_step
            inside = sum(m[k] for k in ("generation", "student_context", "teacher_forward", "student_forward", "loss",
                                        "student_backward"))
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
    # the cost model's rates, measured, and its tables recomputed with them
    costs = result["costs"]
    assert [p["batch"] for p in costs["decode"]] == [1, 2]
    assert all(p["seconds_per_iteration"] > 0 for p in costs["decode"])
    assert set(costs["compute"]) == {"student_forward", "student_train", "teacher_forward"}
    assert all(m["seconds"] > 0 and m["flops"] > 0 for m in costs["compute"].values())
    tiny = common.PRESETS["tiny"]
    for role in ("student", "teacher"):  # the split bench_costs reads off the models is the one gpu_model computes
        expected = gpu_model.qwen2_model(role, tiny.vocab_size, *getattr(tiny, role), dtype_bytes=4)
        assert costs["models"][role]["backbone_params"] == expected.backbone_params
        assert costs["models"][role]["head_params"] == expected.head_params
        assert costs["models"][role]["kv_bytes_per_token"] == expected.kv_bytes_per_token
    assert "measured" in result["model_markdown"] and "| OPD |" in result["model_markdown"]
    assert "Measured rates" in (tmp_path / "gpu_tiny.md").read_text()
