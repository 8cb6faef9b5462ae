"""What data [`HorizonOPDTrainer`] accepts: TRL's prompt-only datasets, a `prompt` column of strings or chat messages
([`~trl.DistillationTrainer`]'s contract), map-style or streamed. Training takes a `Dataset` or an `IterableDataset`;
evaluation also a `DatasetDict`, an `IterableDatasetDict` or a dict of either (one evaluation per key).

Everything is checked at construction, before any model is loaded, from the first row of each dataset: a stream is
peeked, not consumed (each iteration of an `IterableDataset` starts it over, so training still sees that row).
"""

from typing import NoReturn

from datasets import IterableDataset


def check_datasets(train_dataset, eval_dataset, args) -> None:
    """Fail at construction on a dataset the trainer cannot read (`check_prompt_dataset`), and on a train stream
    without `max_steps`."""
    check_prompt_dataset(train_dataset, "train_dataset")
    check_prompt_dataset(eval_dataset, "eval_dataset")
    # transformers refuses this too, but only once the student and the teacher are loaded; the horizon schedules and
    # the learning-rate scheduler are laid out over max_steps, which an epoch count cannot give without a length.
    if isinstance(train_dataset, IterableDataset) and args.max_steps <= 0:
        raise ValueError(
            f"train_dataset is an IterableDataset (a stream, whose length is unknown), so num_train_epochs="
            f"{args.num_train_epochs:g} cannot say how many steps to train, and max_steps={args.max_steps} is not set. "
            f"Set max_steps to the number of optimizer steps (e.g. max_steps=1000): it bounds training and lays out "
            f"the horizon schedule and the learning-rate schedule."
        )
    # TRL's sampler yields whole generation batches only: a dataset smaller than one would train for zero steps.
    # Rolling draws prompts one at a time from its own stream, epoch after epoch, so any size >= 1 works there.
    if args.horizon != "rolling" and train_dataset is not None and not isinstance(train_dataset, IterableDataset) \
            and hasattr(train_dataset, "__len__"):
        batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        if len(train_dataset) < batch:
            raise ValueError(
                f"train_dataset has {len(train_dataset)} rows, fewer than one generation batch of {batch} prompts "
                f"(per_device_train_batch_size={args.per_device_train_batch_size} x gradient_accumulation_steps="
                f"{args.gradient_accumulation_steps} x {args.world_size} processes): TRL's sampler would yield no "
                f"batch and training would run zero steps. Lower per_device_train_batch_size, or use more prompts.")


def check_prompt_dataset(dataset, name: str) -> None:
    """Fail, naming the columns found, when `dataset` (or any dataset of a dict of them) has no rows, no `prompt`
    column, or a first prompt that is neither a string nor a list of chat messages."""
    if dataset is None:
        return
    if isinstance(dataset, dict):  # DatasetDict, IterableDatasetDict or a plain dict: one evaluation per key
        for key, value in dataset.items():
            check_prompt_dataset(value, f"{name}[{key!r}]")
        return
    columns = getattr(dataset, "column_names", None)  # None for a stream whose features are not resolved yet
    if columns is not None and "prompt" not in columns:
        _no_prompt_column(name, columns)
    if isinstance(dataset, IterableDataset):
        row = next(iter(dataset.take(1)), None)
    elif hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        row = dataset[0] if len(dataset) > 0 else None
    else:  # some other iterable: TRL's dataloaders decide what they can read
        return
    if row is None:
        raise ValueError(f"{name} has no rows: there is no prompt to roll out. Pass a dataset with a 'prompt' column "
                         f"and at least one row.")
    if "prompt" not in row:
        _no_prompt_column(name, list(row))
    prompt = row["prompt"]
    is_messages = isinstance(prompt, list) and len(prompt) > 0 and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in prompt)
    if not (isinstance(prompt, str) or is_messages):
        raise ValueError(
            f"{name}['prompt'][0] is a {type(prompt).__name__} ({str(prompt)[:80]!r}); a prompt must be a string or "
            f"a list of chat messages like [{{'role': 'user', 'content': '...'}}]."
        )


def first_prompts(dataset, limit: int) -> list:
    """The prompts of the first `limit` rows of a `Dataset` or a stream (peeked, not consumed); [] for None."""
    if dataset is None:
        return []
    if isinstance(dataset, IterableDataset):
        return [row["prompt"] for row in dataset.take(limit)]
    return [dataset[i]["prompt"] for i in range(min(limit, len(dataset)))]


def _no_prompt_column(name: str, columns) -> NoReturn:
    raise ValueError(
        f"{name} has no 'prompt' column (found columns: {list(columns)}). HorizonOPDTrainer needs prompt-only "
        f"data: rename the column holding prompts to 'prompt', e.g. dataset.rename_column('question', 'prompt')."
    )
