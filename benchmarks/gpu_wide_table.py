"""The table of `gpu_wide.sh`'s rows: python benchmarks/gpu_wide_table.py DIR (prints markdown, torch-free)."""

import glob
import json
import os
import sys

ROWS = [("full_b", "OPD"), ("rolling_0.1_b", "rolling rho=0.1, both caches"),
        ("rolling_0.1_uncached_b", "rolling rho=0.1, no caches"), ("truncated_0.1_b", "TOPD rho=0.1")]


def rows(directory: str) -> list[dict]:
    found = []
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        result = json.load(open(path))["results"][0]
        median = result["median"]
        stem = os.path.basename(path)[:-5]
        label = next(text for prefix, text in sorted(ROWS, key=lambda r: -len(r[0])) if stem.startswith(prefix))
        batch = int(stem.split("_b")[-1].split("_")[0])
        found.append({"file": os.path.basename(path), "method": label, "batch": batch, "steps": len(result["steps"]),
                      "step_s": median["step"], "generation_s": median["generation"],
                      "decode_iterations": median["decode_iterations"], "trained_tokens": median["tokens"],
                      "prefill_tokens": median["prefill_tokens"], "student_nograd_tokens": median["student_nograd_tokens"],
                      "teacher_tokens": median["teacher_tokens"], "peak_gb": result["peak_memory_mb"] / 1024})
    return found


def markdown(found: list[dict]) -> str:
    opd = next((r["step_s"] for r in found if r["method"] == "OPD"), None)
    lines = ["| method | batch (prompts or slots) | step s (median) | vs OPD | generation s | decode it. | trained tokens "
             "| prefill | student no-grad | teacher tokens | peak GB | measured steps |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(found, key=lambda r: (-r["step_s"] if r["method"] == "OPD" else 0, r["batch"], r["method"])):
        ratio = f"{r['step_s'] / opd:.2f}" if opd else ""
        lines.append(f"| {r['method']} | {r['batch']} | {r['step_s']:.2f} | {ratio} | {r['generation_s']:.2f} | "
                     f"{r['decode_iterations']:.0f} | {r['trained_tokens']:,.0f} | {r['prefill_tokens']:,.0f} | "
                     f"{r['student_nograd_tokens']:,.0f} | {r['teacher_tokens']:,.0f} | {r['peak_gb']:.1f} | {r['steps']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(rows(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "results",
                                                                            "gpu_wide"))))
