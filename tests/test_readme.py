"""The README runs as written on a fresh clone.

- Its Python blocks run, in order, in one namespace, in a temporary directory (the minimal example trains the bundled
  pair for its 10 steps; the server block constructs a trainer against a loopback teacher server). The one
  substitution: the README's server address http://127.0.0.1:8000 becomes a free port's, started here with the
  bundled teacher, as the README's `python -m horizon_opd.teacher_server ... --port 8000` would serve it.
- Every shell command in its code blocks, and every command in inline code, is checked without being run: the
  `horizon-opd`, `python -m horizon_opd.teacher_server`, `python benchmarks/*.py` and `examples/distill.py` flags parse
  with the real parsers, the files they name exist, the pip extras exist, the torch pin and the test command are
  exactly `.ci/run`'s. A command of a kind this file does not know fails the test, so a new one cannot go unchecked.
- Its links (and those of docs/*.md) point to files and headings that exist; its measured tables are also in
  docs/results.md, which keeps every measurement.
"""

import argparse
import configparser
import contextlib
import importlib.util
import re
import shlex
import sys
from pathlib import Path
from unittest import mock

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
DOCS = sorted((REPO_ROOT / "docs").glob("*.md"))
README_SERVER_URL = "http://127.0.0.1:8000"

# Inline code that is a command to check (the start of the span); `vllm serve` runs on a GPU host with vLLM, which is
# not installed here: its flags are vLLM's, not ours.
COMMAND_PREFIXES = ("pip ", "python ", "horizon-opd", "accelerate ")
EXTERNAL_COMMANDS = ("vllm serve ",)


def _text(path=README) -> str:
    return path.read_text(encoding="utf-8")


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of every fenced block, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S)]


def shell_commands(text: str) -> list[str]:
    """Every command of the bash blocks (comments dropped, continuations joined, `&&` chains split, a trailing `&`
    dropped) and every inline-code span that starts like a command."""
    commands = []
    for language, code in code_blocks(text):
        if language not in ("bash", "sh", "shell"):
            continue
        code = code.replace("\\\n", " ")
        for line in code.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            commands += [part.strip().rstrip("&").strip() for part in line.split("&&") if part.strip()]
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    for span in re.findall(r"`([^`\n]+)`", prose):
        if span.startswith(COMMAND_PREFIXES + EXTERNAL_COMMANDS):
            commands.append(span.strip())
    return [command for command in commands if command]


def _ci_run() -> str:
    return (REPO_ROOT / ".ci" / "run").read_text()


def _ci_test_command() -> str:
    lines = [line.strip() for line in _ci_run().splitlines() if line.strip() and not line.strip().startswith("#")]
    return lines[-1]


def _extras() -> set[str]:
    config = configparser.ConfigParser()
    config.read(REPO_ROOT / "setup.cfg")
    return set(config["options.extras_require"])


def _markers() -> set[str]:
    config = configparser.ConfigParser()
    config.read(REPO_ROOT / "setup.cfg")
    return {line.split(":")[0].strip() for line in config["tool:pytest"]["markers"].splitlines() if line.strip()}


class _Parsed(Exception):
    pass


@contextlib.contextmanager
def _parse_only():
    """Within: any argparse parser raises `_Parsed(namespace)` once it has parsed, so a `main(argv)` stops there."""
    original = argparse.ArgumentParser.parse_args

    def parse(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse):
        yield


def _parsed_by_main(main, argv) -> argparse.Namespace:
    with _parse_only(), pytest.raises(_Parsed) as parsed:
        main(argv)
    return parsed.value.args[0]


def _load_script(path: Path):
    if str(path.parent) not in sys.path:  # the script's own imports (benchmarks/common.py, ...)
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(f"readme_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_pip(argv: list[str]) -> None:
    assert argv[:1] == ["install"], argv
    pin = re.search(r"pip install -q (torch==\S+)", _ci_run()).group(1)
    for arg in argv[2:]:
        if arg.startswith("torch"):
            assert arg == pin, f"the README installs {arg}, .ci/run {pin}"
        elif arg.startswith("."):
            extras = re.fullmatch(r"\.(?:\[(.*)\])?", arg).group(1)
            missing = set(filter(None, (extras or "").split(","))) - _extras()
            assert not missing, f"pip extras {missing} are not in setup.cfg"
        else:
            assert arg == "-e", f"unexpected pip argument {arg!r}"


def _check_horizon_opd(argv: list[str]) -> None:
    from horizon_opd import cli

    if "--help" in argv or "-h" in argv:
        with pytest.raises(SystemExit) as exited:
            cli.parse_args(argv)
        assert exited.value.code == 0
        return
    args, methods = cli.parse_args(argv)  # bad flags exit with status 2
    assert methods


def _check_python(argv: list[str]) -> None:
    if argv[:2] == ["-m", "pytest"]:
        assert " ".join(["python", *argv]).startswith(_ci_test_command())
        if "-m" in argv[2:]:
            expression = argv[argv.index("-m", 2) + 1]
            assert set(re.findall(r"\w+", expression)) - {"not", "and", "or"} <= _markers(), expression
    elif argv[:2] == ["-m", "horizon_opd.teacher_server"]:
        from horizon_opd import teacher_server

        args = _parsed_by_main(teacher_server.main, argv[2:])
        assert (REPO_ROOT / args.model / "config.json").is_file(), args.model
    elif argv[:2] == ["-m", "horizon_opd.demo.train_models"] or argv[:2] == ["-m", "horizon_opd.demo.mismatch"]:
        assert importlib.util.find_spec(argv[1]) is not None
    elif argv[:2] == ["-m", "horizon_opd.demo.two_teachers"]:
        from horizon_opd.demo import two_teachers

        _parsed_by_main(two_teachers.main, argv[2:])
    elif argv and argv[0].startswith("benchmarks/"):
        script = REPO_ROOT / argv[0]
        assert script.is_file(), script
        _parsed_by_main(_load_script(script).main, argv[1:])
    else:
        raise AssertionError(f"no check for `python {' '.join(argv)}`: add one to tests/test_readme.py")


def _check_accelerate(argv: list[str]) -> None:
    assert argv[0] == "launch" and argv[1] == "--config_file", argv
    assert (REPO_ROOT / argv[2]).is_file(), argv[2]
    script = REPO_ROOT / argv[3]
    assert script.name == "distill.py" and script.is_file(), script
    parser = _load_script(script).make_parser()
    # Flags and values only: building the configs would refuse GPU settings (--bf16) on this CPU.
    namespace, unknown = argparse.ArgumentParser.parse_known_args(parser, argv[4:])
    assert not unknown, f"examples/distill.py does not know {unknown}"
    assert namespace.max_steps > 0 and namespace.model_name_or_path


def check_command(command: str) -> None:
    if command.startswith(EXTERNAL_COMMANDS):
        return
    argv = shlex.split(command)
    program, rest = argv[0], argv[1:]
    if program == "pip":
        _check_pip(rest)
    elif program == "horizon-opd":
        _check_horizon_opd(rest)
    elif program == "python":
        _check_python(rest)
    elif program == "accelerate":
        _check_accelerate(rest)
    elif program == "bash":
        _check_bash(rest)
    else:
        raise AssertionError(f"no check for `{command}`: add one to tests/test_readme.py")


def _check_bash(rest: list[str]) -> None:
    script = REPO_ROOT / rest[0]
    assert script.is_file(), f"bash {rest[0]}: no such script"
    if script.name == "install_vllm.sh":
        modes = re.findall(r'"\$target" = (\w+)', script.read_text())
        assert rest[1:2] and rest[1] in modes, f"bash {' '.join(rest)}: the script's modes are {modes}"


def test_readme_is_a_users_guide_under_250_lines():
    text = _text()
    assert len(text.splitlines()) < 250
    for heading in ("## Two commands", "## Minimal example", "## Which horizon should I use", "## Scale and ship",
                    "## Costs, and what each counter means", "## Tests", "## Files"):
        assert f"\n{heading}\n" in text, heading
    assert re.search(r"!\[[^\]]*\]\([^)]+\.png\)", text), "the README keeps a picture"


def test_two_commands_install_and_run_the_main_job_and_the_ci_test_command():
    _, two = next(block for block in code_blocks(_text()) if "horizon-opd" in block[1])
    commands = [line for line in two.splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2, commands
    main_job, tests = commands
    assert main_job.startswith("pip install torch==") and "horizon-opd" in main_job
    assert tests.startswith("pip install torch==") and tests.endswith(" && " + _ci_test_command())
    assert "pytest" in _ci_test_command()


@pytest.mark.parametrize("command", shell_commands(_text()))
def test_every_readme_command_parses(command):
    check_command(command)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation other than '-' and '_' dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", _text(path), flags=re.M | re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_links_point_to_existing_files_and_headings(path):
    text = re.sub(r"^```.*?^```", "", _text(path), flags=re.M | re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(target)
    assert not broken, broken


def test_the_readmes_measured_tables_are_kept_in_docs_results():
    results = _text(REPO_ROOT / "docs" / "results.md")
    rows = [line for line in _text().splitlines() if line.startswith("| ") and re.search(r"\d\.\d", line)]
    assert rows
    missing = [row for row in rows if row not in results]
    assert not missing, missing


@pytest.fixture
def readme_teacher_server():
    from horizon_opd.demo import TEACHER_PATH
    from horizon_opd.teacher_server import serve_teacher

    with serve_teacher(TEACHER_PATH, port=0) as server:
        yield server


def test_readme_python_blocks_run(tmp_path, monkeypatch, readme_teacher_server):
    blocks = [code for language, code in code_blocks(_text()) if language == "python"]
    assert blocks, "the README has a minimal example"
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme"}
    trained, built = {}, []
    for code in blocks:
        exec(compile(code.replace(README_SERVER_URL, readme_teacher_server.url), "README.md", "exec"), namespace)
        trainer = namespace.get("trainer")
        if trainer is not None and trainer.state.global_step:
            trained[id(trainer)] = trainer
        built.append(trainer)
    # The minimal example trained all its steps, and its cost ledger counted each one.
    assert trained and all(t.cost.steps == t.state.global_step == t.args.max_steps for t in trained.values())
    # The server block built its trainer against the server (construction reads the server's /v1/models).
    assert any(t is not None and t.args.teacher_model_server_url == readme_teacher_server.url for t in built)
    # The several-teachers block routes its rows to two named teachers.
    assert any(t is not None and t.teacher_names == ["math", "code"] for t in built)
