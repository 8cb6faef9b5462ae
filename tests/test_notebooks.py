"""The notebooks in notebooks/: stored without outputs and written against the public API (fast), and each one executed
top to bottom on the CPU with nbclient, in a temporary working directory, offline (slow).

nbclient runs a real Jupyter kernel, so a notebook is tested as a user runs it (matplotlib's inline backend, display
outputs, the working directory its relative paths land in); a cell that raises fails the test with its traceback.
"""

import ast
import os
import re
import time
from pathlib import Path

import nbformat
import pytest

import horizon_opd
import horizon_opd.analysis
import horizon_opd.demo

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
NOTEBOOKS = ["01_quickstart.ipynb", "02_horizon_study.ipynb", "03_lora_and_hub.ipynb", "04_paper_analyses.ipynb"]
# A cell that runs this long is hung, not slow: a guard, not a budget. How long each notebook takes is a benchmark's
# question (benchmarks/bench_notebooks.py prints each test's time beside its budget); a test that fails because the
# machine is busy tests the machine, not the code.
CELL_TIMEOUT_S = 3600
# Where a notebook may write in its working directory: its outputs (git-ignored, so running a notebook in place
# leaves the repository clean) and the private HF_HOME the test gives its kernel.
ALLOWED_OUTPUTS = {"outputs", ".hf_home"}


def _public_names(module) -> set[str]:
    """`__all__`, or for a module without one, the functions and classes it defines whose names are not private."""
    if hasattr(module, "__all__"):
        return set(module.__all__)
    return {name for name, value in vars(module).items()
            if not name.startswith("_") and getattr(value, "__module__", None) == module.__name__}


# The modules a notebook may import from, and the names it may use from each: the library, its demo, its analyses.
PUBLIC = {
    "horizon_opd": set(horizon_opd.__all__) | {"__version__"},
    "horizon_opd.demo": _public_names(horizon_opd.demo),
    "horizon_opd.analysis": _public_names(horizon_opd.analysis),
}
FAKE_TOKEN = "hf_horizonFakeTokenForTheLoopbackHub"


def _read(name: str):
    return nbformat.read(NOTEBOOK_DIR / name, as_version=4)


def _code(nb) -> list[str]:
    # IPython magics and shell escapes are not Python; none of our notebooks needs one, but don't choke on them.
    return ["\n".join(l for l in c.source.splitlines() if not l.lstrip().startswith(("%", "!")))
            for c in nb.cells if c.cell_type == "code"]


# ------------------------------------------------------------------------------------------------------------ fast
def test_every_notebook_is_run_by_a_test():
    assert sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")) == NOTEBOOKS
    tests = {name for name in globals() if name.startswith("test_0")}
    assert sorted(name[5:7] for name in tests) == [notebook[:2] for notebook in NOTEBOOKS]


def test_what_the_notebooks_write_is_git_ignored():
    """They write under outputs/ only (checked when they run, below); running one in place must leave no untracked
    files, so .gitignore lists outputs/."""
    ignored = (REPO_ROOT / ".gitignore").read_text().splitlines()
    assert "outputs/" in ignored or "/notebooks/outputs/" in ignored


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_without_outputs(name):
    nb = _read(name)
    nbformat.validate(nb)
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name} cell {index} has outputs: strip them"
    assert "widgets" not in nb.metadata


def _api_problems(source: str) -> list[str]:
    """What in `source` goes beyond the public API: `from M import X` and `import M [as a]` (then `a.X`) are allowed
    for M in PUBLIC and X among M's public names; any other horizon_opd submodule, or a private name, is not."""
    problems, aliases = [], {}  # aliases: local name -> module
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "horizon_opd":
            if node.module not in PUBLIC:
                problems.append(f"from {node.module} import ...: import from one of {sorted(PUBLIC)}")
                continue
            for alias in node.names:
                if alias.name not in PUBLIC[node.module]:
                    problems.append(f"{alias.name} is not public in {node.module}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != "horizon_opd":
                    continue
                if alias.name not in PUBLIC:
                    problems.append(f"import {alias.name}: import from one of {sorted(PUBLIC)}")
                elif alias.asname:
                    aliases[alias.asname] = alias.name
                elif alias.name == "horizon_opd":
                    aliases["horizon_opd"] = "horizon_opd"
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}  # a.b of a.b.c: check a.b.c once
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in inner:
            dotted, base = [node.attr], node.value
            while isinstance(base, ast.Attribute):
                dotted.insert(0, base.attr)
                base = base.value
            if not isinstance(base, ast.Name) or base.id not in aliases:
                continue
            module = aliases[base.id]
            if module == "horizon_opd" and f"horizon_opd.{dotted[0]}" in PUBLIC:
                if len(dotted) == 1:
                    continue  # the module itself: horizon_opd.demo
                module, dotted = f"horizon_opd.{dotted[0]}", dotted[1:]  # horizon_opd.demo.X
            if dotted[0] not in PUBLIC[module]:
                problems.append(f"{base.id}.{'.'.join(dotted)}: {dotted[0]} is not public in {module}")
    return problems


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_uses_only_the_public_api(name):
    """Notebooks import the library (`horizon_opd.__all__`), its demo (`horizon_opd.demo.__all__`) and its analyses
    (`horizon_opd.analysis`), nothing private and no other submodule (`horizon_opd.trainer`, `horizon_opd.demo.compare`,
    ...)."""
    problems = [p for source in _code(_read(name)) for p in _api_problems(source)]
    assert not problems, f"{name}: {problems}"


@pytest.mark.parametrize("source, allowed", [
    ("from horizon_opd import HorizonOPDTrainer, horizon_at", True),
    ("from horizon_opd.demo import run_method, load_demo_models", True),
    ("from horizon_opd.analysis import prefix_continuation", True),
    ("import horizon_opd.demo as demo\ndemo.build_datasets()", True),
    ("import horizon_opd\nhorizon_opd.demo.run_method", True),
    ("from horizon_opd.trainer import HorizonOPDTrainer", False),
    ("from horizon_opd.demo.compare import run_method", False),
    ("from horizon_opd.analysis import _generate", False),
    ("from horizon_opd import HorizonSchedule", False),
    ("from horizon_opd.demo import compare", False),
    ("import horizon_opd.horizon", False),
    ("import horizon_opd.demo as demo\ndemo.compare.plot", False),
    ("import horizon_opd\nhorizon_opd.trainer", False),
])
def test_the_public_api_rule_itself(source, allowed):
    assert (not _api_problems(source)) == allowed, _api_problems(source)


# ------------------------------------------------------------------------------------------------------------ slow
def _kernel_env(workdir: Path, **overrides) -> dict:
    """The user's environment minus anything that would reach the real Hub, offline, with the inline plot backend."""
    drop = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "MPLBACKEND")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
        HF_HOME=str(workdir / ".hf_home"),  # no saved login either
        TOKENIZERS_PARALLELISM="false", MPLBACKEND="module://matplotlib_inline.backend_inline",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p),
    )
    env.update(overrides)
    return env


def _execute(name: str, workdir: Path, env: dict, then=None):
    """Run every cell of the notebook in one kernel started in `workdir`; a cell that raises raises here
    (`CellExecutionError`, with the traceback). `then(client, nb)` runs in the same kernel afterwards."""
    from nbclient import NotebookClient

    nb = _read(name)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(workdir)}})
    start = time.perf_counter()
    with client.setup_kernel(env=env):
        for index, cell in enumerate(nb.cells):
            client.execute_cell(cell, index)
        seconds = time.perf_counter() - start
        if then is not None:
            then(client, nb)
    print(f"{name}: {seconds:.1f} s")  # read by benchmarks/bench_notebooks.py
    assert not [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    written = {p.name for p in workdir.iterdir()} - ALLOWED_OUTPUTS
    assert not written, f"{name} wrote {sorted(written)} outside outputs/ (which .gitignore covers)"
    return nb


def _text(cell) -> str:
    parts = []
    for output in cell.get("outputs", []):
        if output.output_type == "stream" and output.name == "stdout":
            parts.append(output.text)
        for mime in ("text/plain", "text/markdown"):
            parts.append(output.get("data", {}).get(mime, ""))
    return "".join(parts)


def _all_text(nb) -> str:
    return "".join(_text(c) for c in nb.cells if c.cell_type == "code")


def _figures(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def _accuracy(text: str, label: str) -> float:
    return float(re.search(rf"{label}\s+([0-9.]+)", text).group(1))


@pytest.mark.slow
def test_01_quickstart_runs_and_improves_the_student(tmp_path):
    nb = _execute("01_quickstart.ipynb", tmp_path, _kernel_env(tmp_path))
    text = _all_text(nb)
    before = _accuracy(text, "student accuracy before training")
    after = _accuracy(text, "student accuracy after training")
    assert after > before, (before, after)
    assert _accuracy(text, "reloaded student accuracy") == after  # what was saved is what was evaluated
    horizon, L = map(int, re.search(r"training rollouts stop at (\d+) of L = (\d+) tokens", text).groups())
    assert horizon == -(-L // 10)  # ceil(0.1 L)
    assert _figures(nb) == 1
    assert (tmp_path / "outputs" / "topd-quickstart" / "model.safetensors").is_file()


@pytest.mark.slow
def test_02_horizon_study_runs_and_draws_its_three_figures(tmp_path):
    nb = _execute("02_horizon_study.ipynb", tmp_path, _kernel_env(tmp_path))
    text = _all_text(nb)
    assert _figures(nb) == 3  # accuracy vs wall-clock, POPD schedule, KL by position
    for name in ("OPD", "TOPD rho=0.1", "POPD linear 0.1->1"):
        assert re.search(rf"{re.escape(name)}\s+final accuracy [0-9.]+\s+train seconds", text), name
        assert re.search(rf"after {re.escape(name)}\s+KL in the first bin", text), name
    assert "student before training" in text
    assert re.search(r"'teachers/even/share': 0\.\d+", text) and "'teachers/odd/kl'" in text  # section 5, routed


@pytest.mark.slow
def test_03_lora_and_hub_runs_without_a_token_and_pushes_with_one(tmp_path):
    """Without HF_TOKEN the push cell only lists the files; then, in the same kernel, with a token it pushes them to a
    fake Hub on 127.0.0.1 with the real huggingface_hub client (tests/fake_hub.py)."""
    from fake_hub import USER, FakeHub

    def push_with_a_token(client, nb):
        push = next(i for i, c in enumerate(nb.cells) if "push" in c.metadata.get("tags", []))
        assert "HF_TOKEN is not set" in _text(nb.cells[push])
        nb.cells.append(nbformat.v4.new_code_cell(f"os.environ['HF_TOKEN'] = {FAKE_TOKEN!r}"))
        nb.cells.append(nbformat.v4.new_code_cell(nb.cells[push].source))
        for index in (len(nb.cells) - 2, len(nb.cells) - 1):
            client.execute_cell(nb.cells[index], index)

    with FakeHub() as hub:
        env = _kernel_env(tmp_path, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", TRANSFORMERS_OFFLINE="0",
                          HF_HUB_DISABLE_XET="1", NO_PROXY="127.0.0.1,localhost")
        for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
            env.pop(proxy, None)
        nb = _execute("03_lora_and_hub.ipynb", tmp_path, env, then=push_with_a_token)

    text = _all_text(nb)
    assert "## Distillation setup" in text and "LoRA (r = 16" in text  # the card, displayed
    assert _accuracy(text, "merged model accuracy") == _accuracy(text, "student accuracy with the trained adapter")
    assert (tmp_path / "outputs" / "demo-student-topd-merged" / "model.safetensors").is_file()

    assert "pushed to" in _text(nb.cells[-1]), _text(nb.cells[-1])
    files = hub.repos[f"{USER}/demo-student-topd-lora"]
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= set(files)
    assert b"## Distillation setup" in files["README.md"]
    assert not hub.unhandled


@pytest.mark.slow
def test_04_paper_analyses_runs_and_draws_one_figure_per_analysis(tmp_path):
    nb = _execute("04_paper_analyses.ipynb", tmp_path, _kernel_env(tmp_path))
    text = _all_text(nb)
    assert _figures(nb) == 5  # Figs. 13, 9/10, 12, 3/14, 11
    teacher, student = map(float, re.search(r"teacher ([0-9.]+), student ([0-9.]+)", text).groups())

    # Fig. 13: TOPD lowered the KL in the middle of full-length rollouts, past its own 10% horizon.
    middle = float(re.search(r"Fig\. 13 .* middle six ([0-9.]+)", text).group(1))
    assert middle < 1.0, middle

    # Figs. 9/10: ratio 0 is the student alone and ratio 1 the teacher's rollout (prefix_continuation's definition);
    # after TOPD the student alone does better than before.
    curves = {label: [float(v) for v in values.split(" / ")] for label, values in re.findall(
        r"Figs 9/10 (student before|after TOPD rho=0\.1)\s+accuracy at prefix ratio [0-9./ ]+: ([0-9./ ]+)", text)}
    assert len(curves["student before"]) == len(curves["after TOPD rho=0.1"]) == 5
    assert curves["student before"][0] == student and curves["student before"][-1] == teacher
    assert curves["after TOPD rho=0.1"][-1] == teacher
    assert curves["after TOPD rho=0.1"][0] > curves["student before"][0]

    # Figs. 12, 3/14 and 11: every run over 3 seeds reported; distillation from the teacher helped every variant.
    for label in ("first half [0, 0.5]", "second half [0.5, 1]", "whole rollout", "token-level, exact (reverse_kl)",
                  "token-level, sampled", "sequence-level (sequence)"):
        mean = float(re.search(rf"{re.escape(label)}\s+accuracy ([0-9.]+) ± [0-9.]+", text).group(1))
        assert mean > student, (label, mean, student)
    before, after = map(float, re.search(r"Fig\. 11\s+stronger student ([0-9.]+) -> ([0-9.]+)", text).groups())
    assert before == teacher and after <= before
