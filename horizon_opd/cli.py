"""`horizon-opd`: distill a teacher into a student with several horizon policies on the same step budget and compare.

With no arguments it runs the embedded demo (a successor-table reasoning task with a bundled teacher and student, on
the CPU in a few minutes) and writes `results.json` and `accuracy_vs_time.png` under `--output-dir`. With
`--student`, `--teacher` and `--dataset` (local paths) it distills your own models with one or more methods. With
`--teacher-url` the teacher is a server (`vllm serve TEACHER` or `python -m horizon_opd.teacher_server --model
TEACHER`) that scores the student's rollouts over HTTP; no teacher is loaded here.
"""

import argparse
from pathlib import Path

from .config import LOSS_TYPES, REMOTE_LOSS_TYPES
from .horizon import method_names

# Held-out rows read from the head of a --streaming dataset when --eval-size does not say (a stream has no length to
# take a fraction of).
STREAM_HELD_OUT = 100


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be > 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .demo.compare import DEFAULT_METHOD_NAMES

    p = argparse.ArgumentParser(prog="horizon-opd", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="runs/horizon-opd", help="where results.json and the plot are written")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHOD_NAMES),
                   help=f"methods to compare: {', '.join(method_names())} (e.g. topd0.1 for TOPD with rho = 0.1), "
                        f"and opd-matched<rho>: OPD on ceil(rho x batch) prompts per step, a truncated method's tokens "
                        f"per update (the baseline that tells the horizon from the update size), and "
                        f"rolling-wide<rho> / topd-wide<rho>: the method on ceil(batch / rho) prompts per step, OPD's "
                        f"tokens per update; a rolling method may end with +memory (rolling_student_memory, then "
                        f"+refresh<k>), +grad (rolling_context_grad) or the diagnostic +resample, e.g. "
                        f"rolling-wide0.1+memory; default: {' '.join(DEFAULT_METHOD_NAMES)}")
    p.add_argument("--steps", type=_positive_int, default=None, help="optimizer steps per method (default: 60; "
                                                                     "quick: 8)")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="prompts per step (default: 32; quick: 8)")
    p.add_argument("--learning-rate", type=_positive_float, default=1e-3)
    p.add_argument("--eval-every", type=_positive_int, default=None,
                   help="evaluate every N steps (default: 10; quick: 4)")
    p.add_argument("--eval-size", type=_positive_int, default=None, help="held-out prompts evaluated (default: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed, e.g. --seeds 0 1 2")
    p.add_argument("--quick", action="store_true", help="a tiny run (seconds) that exercises the whole pipeline")
    p.add_argument("--student", default=None, help="student model directory (default: the bundled demo student)")
    p.add_argument("--teacher", default=None, help="teacher model directory (default: the bundled demo teacher)")
    p.add_argument("--dataset", default=None,
                   help="prompt dataset: a `datasets.save_to_disk` directory or a .json/.jsonl file with a 'prompt' "
                        "column (and 'answer' for exact-match accuracy of the last number); default: the demo task")
    p.add_argument("--streaming", action="store_true",
                   help="read the .json/.jsonl --dataset as a stream instead of loading it: the first --eval-size "
                        f"rows (default {STREAM_HELD_OUT}) are held out for evaluation, training streams the rest")
    p.add_argument("--max-completion-length", type=_positive_int, default=None,
                   help="full horizon L (default: the task's)")
    p.add_argument("--teacher-url", default=None,
                   help="score with a teacher server at this URL (vLLM /v1/completions with prompt_logprobs, or "
                        "`python -m horizon_opd.teacher_server`) instead of loading --teacher; the teacher's own "
                        "accuracy is then not measured")
    p.add_argument("--loss-type", default=None, choices=list(LOSS_TYPES),
                   help="distillation loss (default: reverse_kl; topk_reverse_kl with --teacher-url)")
    p.add_argument("--save-model", action="store_true", help="save each distilled student under output-dir")
    return p


def parse_args(argv=None) -> tuple[argparse.Namespace, list]:
    """Parsed arguments and the methods they name; bad input ends with one line and exit status 2, as argparse does."""
    from .demo.compare import method

    parser = build_parser()
    args = parser.parse_args(argv)
    methods = []
    for name in args.methods:
        try:
            methods.append(method(name))
        except ValueError as error:
            parser.error(f"argument --methods: {error}")
    for flag in ("student", "teacher"):
        path = getattr(args, flag)
        if path is not None and not (Path(path) / "config.json").is_file():
            parser.error(f"argument --{flag}: {path!r} is not a model directory (no config.json there); pass a "
                         f"directory written by save_pretrained")
    if args.teacher_url is not None:
        if not args.teacher_url.startswith(("http://", "https://")):
            parser.error(f"argument --teacher-url: {args.teacher_url!r} is not an http(s) URL; pass e.g. "
                         f"http://127.0.0.1:8000")
        if args.teacher is not None:
            parser.error("argument --teacher-url: not allowed with --teacher (the teacher is the server's model)")
        if args.loss_type is not None and args.loss_type not in REMOTE_LOSS_TYPES:
            parser.error(f"argument --loss-type: {args.loss_type!r} needs a local teacher's full distributions; with "
                         f"--teacher-url use one of {', '.join(REMOTE_LOSS_TYPES)}")
    elif args.loss_type == "topk_reverse_kl":
        parser.error("argument --loss-type: topk_reverse_kl needs --teacher-url (a teacher server's top-k log-probs)")
    if args.dataset is not None and not Path(args.dataset).exists():
        parser.error(f"argument --dataset: {args.dataset!r} does not exist; pass a save_to_disk directory or a "
                     f".json/.jsonl file with a 'prompt' column")
    if args.streaming and (args.dataset is None or Path(args.dataset).suffix not in (".json", ".jsonl")):
        parser.error(f"argument --streaming: streams a .json/.jsonl --dataset, not {args.dataset!r}; a save_to_disk "
                     f"directory is memory-mapped already and the demo task is built in memory: drop --streaming")
    args.parser = parser
    return args, methods


def load_inputs(args):
    """Student, teacher (None with `--teacher-url`), tokenizer, train and held-out prompts, and the full horizon."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import demo

    if args.dataset is None:
        data = demo.build_datasets()
        max_len = demo.MAX_COMPLETION_LENGTH
    else:
        try:
            data = demo.load_prompt_dataset(args.dataset, streaming=args.streaming,
                                            held_out=args.eval_size or STREAM_HELD_OUT)
        except ValueError as error:
            args.parser.error(f"argument --dataset: {error}")
        max_len = 256
    student_path = args.student or demo.STUDENT_PATH
    tokenizer = AutoTokenizer.from_pretrained(student_path)
    student = AutoModelForCausalLM.from_pretrained(student_path)
    teacher = None if args.teacher_url else AutoModelForCausalLM.from_pretrained(args.teacher or demo.TEACHER_PATH)
    return student, teacher, tokenizer, data["train"], data["test"], args.max_completion_length or max_len


def main(argv=None) -> None:
    """Console entry point (`horizon-opd`)."""
    run(argv)


def run(argv=None) -> dict:
    """Parse `argv`, run the comparison, write results.json and the plot, print the table; return the results."""
    args, methods = parse_args(argv)
    quick = args.quick
    steps = args.steps or (8 if quick else 60)
    batch_size = args.batch_size or (8 if quick else 32)
    eval_every = args.eval_every or (4 if quick else 10)
    eval_size = args.eval_size or (16 if quick else None)

    import torch

    from .demo.compare import run_comparison
    from .demo.evaluation import evaluate_accuracy

    torch.set_num_threads(min(2, torch.get_num_threads()))
    student, teacher, tokenizer, train_dataset, eval_dataset, max_len = load_inputs(args)
    if eval_size is not None:
        eval_dataset = eval_dataset.select(range(min(eval_size, len(eval_dataset))))
    has_answers = "answer" in eval_dataset.column_names
    evaluate = (lambda model: evaluate_accuracy(model, tokenizer, eval_dataset, max_len)) if has_answers \
        else (lambda model: float("nan"))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)  # only once every input has been checked: bad input writes nothing
    return run_comparison(methods, student, teacher, tokenizer, train_dataset, eval_dataset, seeds=args.seeds,
                          out=out, steps=steps, batch_size=batch_size, learning_rate=args.learning_rate,
                          max_completion_length=max_len, eval_every=eval_every, evaluate=evaluate,
                          save_model=args.save_model, settings={"quick": quick}, extra_args=_loss_args(args))


def _loss_args(args) -> dict:
    """The config fields `--teacher-url` and `--loss-type` set (none: the config's defaults)."""
    extra = {} if args.loss_type is None else {"loss_type": args.loss_type}
    if args.teacher_url is not None:
        extra = {"teacher_model_server_url": args.teacher_url, "loss_type": "topk_reverse_kl", **extra}
    return extra


if __name__ == "__main__":
    main()
