"""Runs tests/test_vllm.py in the vLLM venv when this interpreter has no vLLM.

vLLM's CPU build pins transformers < 5.18 and torch 2.13.0+cpu, and pulls packages the rest of the suite does not want,
so it lives in a venv of its own: `scripts/install_vllm.sh cpu` inside `.venv-vllm` (what .ci/run builds), or any venv
named by HORIZON_OPD_VLLM_PYTHON. Without one the test is skipped, except under CI, where it fails: the vLLM path must
run there.
"""

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

from testing_utils import REPO_ROOT


def vllm_python() -> Path | None:
    named = os.environ.get("HORIZON_OPD_VLLM_PYTHON")
    candidate = Path(named) if named else REPO_ROOT / ".venv-vllm" / "bin" / "python"
    return candidate if candidate.is_file() else None


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here: tests/test_vllm.py "
                                                                          "runs in this session directly")
def test_vllm_tests_pass_in_the_vllm_venv():
    python = vllm_python()
    if python is None:
        message = ("no vLLM venv: build one with `python3 -m venv .venv-vllm && . .venv-vllm/bin/activate && "
                   "bash scripts/install_vllm.sh cpu`, or name its python in HORIZON_OPD_VLLM_PYTHON")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    run = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_vllm.py"],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1200)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    print(f"tests/test_vllm.py in {python}: {summary}")
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-4000:]
    assert " passed" in summary and "skipped" not in summary, summary  # every vLLM test ran
