"""The embedded demo: a successor-table reasoning task, and a teacher and a student trained on it, shipped in the
package so the library's main job runs offline on a CPU (`horizon-opd`, the notebooks, the examples)."""

from pathlib import Path

from .compare import DEFAULT_METHOD_NAMES, Method, method, run_comparison, run_method
from .evaluation import evaluate_accuracy, generate_completions
from .task import MAX_COMPLETION_LENGTH, accuracy, build_datasets, extract_answer
from .tokenizer import build_char_tokenizer

MODELS_DIR = Path(__file__).parent / "models"
TEACHER_PATH = str(MODELS_DIR / "teacher")
STUDENT_PATH = str(MODELS_DIR / "student")


def load_demo_models():
    """(student, teacher, tokenizer) of the bundled demo, loaded with `from_pretrained` from the package."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(STUDENT_PATH)
    return (AutoModelForCausalLM.from_pretrained(STUDENT_PATH), AutoModelForCausalLM.from_pretrained(TEACHER_PATH),
            tokenizer)


def load_prompt_dataset(path: str, test_fraction: float = 0.1, seed: int = 0, streaming: bool = False,
                        held_out: int = 100):
    """A user's prompt dataset from a `save_to_disk` directory (a DatasetDict with `train`/`test`, or one Dataset that
    is split here) or a .json/.jsonl file, as a DatasetDict with `train` and `test`.

    With `streaming=True` a .json/.jsonl file is read as a stream: a dict whose `test` is its first `held_out` rows (a
    Dataset in memory: evaluation needs a fixed set) and whose `train` is an IterableDataset of the rows after them."""
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    if streaming:
        from ..data import check_prompt_dataset

        stream = load_dataset("json", data_files=path, streaming=True)["train"]
        check_prompt_dataset(stream, path)
        test = Dataset.from_list(list(stream.take(held_out)))
        train = stream.skip(held_out)
        if next(iter(train.take(1)), None) is None:
            raise ValueError(f"{path} has {len(test)} row(s), all held out for evaluation (the first {held_out}); "
                             f"it needs more, or hold out fewer (held_out; --eval-size on the command line).")
        return {"train": train, "test": test}
    if Path(path).is_dir():
        data = load_from_disk(path)
    else:
        data = load_dataset("json", data_files=path)["train"]
    if isinstance(data, Dataset):
        data = DatasetDict(train=data)
    if not isinstance(data, DatasetDict) or "train" not in data:
        raise ValueError(f"{path} must hold a Dataset or a DatasetDict with a 'train' split; found {type(data)}.")
    for split, rows in data.items():
        if "prompt" not in rows.column_names:
            raise ValueError(f"{path} has no 'prompt' column in its {split!r} split (columns: {rows.column_names}); "
                             f"name the column holding the prompts 'prompt'.")
    if "test" not in data:
        if len(data["train"]) < 2:
            raise ValueError(f"{path} has {len(data['train'])} row(s); it needs at least 2 to hold some out for "
                             f"evaluation (or a DatasetDict with 'train' and 'test' splits).")
        data = data["train"].train_test_split(test_size=test_fraction, seed=seed)
    return data


__all__ = [
    "DEFAULT_METHOD_NAMES",
    "MAX_COMPLETION_LENGTH",
    "Method",
    "STUDENT_PATH",
    "TEACHER_PATH",
    "accuracy",
    "build_char_tokenizer",
    "build_datasets",
    "evaluate_accuracy",
    "extract_answer",
    "generate_completions",
    "load_demo_models",
    "load_prompt_dataset",
    "method",
    "run_comparison",
    "run_method",
]
