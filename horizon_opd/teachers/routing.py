"""Several teachers in one run: which teachers a [`HorizonOPDTrainer`] has, and which one scores each prompt.

One teacher is the plain case: `teacher_model` (a model, path or Hub id) or one `teacher_model_server_url`. Several
teachers are named: `teacher_model={name: model or id}` and/or `teacher_model_server_url={name: URL}` (disjoint
names), and each dataset row names its teacher in `args.teacher_id_column` (TRL's `teacher_id`), as TRL's
`AsyncDistillationTrainer` routes its servers (MOPD, arXiv 2606.30406). Routing is by row: the generated batch carries
each row's teacher index (`teacher_index`) through TRL's shuffle and split, a rolling slot keeps its row (and so its
teacher) until its rollout ends, and the loss scores each row's positions with its own teacher.

What is checked at construction: the two kinds of names are disjoint, a map-style dataset's column exists and names
only known teachers (every row read once), a stream's first row has the column; a stream's later row naming an unknown
teacher fails at the batch that reads it, naming the value (`teacher_indices`).
"""

from dataclasses import dataclass

from datasets import IterableDataset

from .local import attach_teacher, load_teacher
from .remote import attach_teacher_server, connect_teacher_server


@dataclass
class Teacher:
    """One teacher of a run: a local model (prepared, frozen) or a server client, the vocabulary the student's head is
    sliced to against it (None: the whole head), and with rolling rollouts its keys and values per slot."""

    name: str | None  # None: the run's only teacher (no routing column)
    model: object = None  # the prepared local teacher
    server: object = None  # a RemoteTeacher
    shared_vocab_size: int | None = None
    cache: object = None  # a kv_cache.TeacherSlotCache (rolling, local teachers)


def plan_teachers(teacher_model, urls: dict | None) -> dict:
    """`{name: ("local", model or id) | ("server", URL)}` in the order given (local teachers first); the single
    teacher's name is None. Raises, naming the fix, on a missing teacher, a single teacher beside named ones, or a
    name given twice."""
    named_local = isinstance(teacher_model, dict)
    named_servers = urls is not None and None not in urls
    if teacher_model is None and urls is None:
        raise ValueError("HorizonOPDTrainer needs a teacher_model (a model instance or a local path / Hub id), or "
                         "teacher_model_server_url in the config to score with a teacher server.")
    if not named_local and not named_servers:
        if teacher_model is not None and urls is not None:
            raise ValueError(
                f"Both teacher_model ({describe(teacher_model)}) and teacher_model_server_url={urls[None]!r} are set; "
                f"the teacher is one or the other. Pass teacher_model=None to use the server, or drop the URL from "
                f"the config to use the local teacher. For several teachers, name them: teacher_model={{name: model}} "
                f"and teacher_model_server_url={{name: URL}}.")
        return {None: ("local", teacher_model)} if urls is None else {None: ("server", urls[None])}
    if named_local and not teacher_model:
        raise ValueError("teacher_model={} names no teacher; pass {name: model or id, ...}.")
    if (teacher_model is not None and not named_local) or (urls is not None and not named_servers):
        single = (f"teacher_model ({describe(teacher_model)})" if not named_local
                  else f"teacher_model_server_url={urls[None]!r}")
        raise ValueError(f"{single} is one unnamed teacher beside named ones; with several teachers every teacher has "
                         f"a name (the values of the dataset's teacher_id_column). Pass a dict for both, e.g. "
                         f"teacher_model={{'math': model}} and teacher_model_server_url={{'code': URL}}.")
    local = dict(teacher_model) if named_local else {}
    servers = dict(urls) if named_servers else {}
    for name in local:
        if not isinstance(name, str) or not name:
            raise ValueError(f"teacher_model has the key {name!r}; teacher names are non-empty strings, the values of "
                             f"the dataset's teacher_id_column.")
    both = sorted(set(local) & set(servers))
    if both:
        raise ValueError(f"The teacher name(s) {both} are in both teacher_model and teacher_model_server_url; a name "
                         f"is one teacher, local or served. Rename one of them (and the rows that name it).")
    for name, model in local.items():
        if model is None:
            raise ValueError(f"teacher_model[{name!r}] is None; give a model instance or a path / Hub id.")
    return {**{n: ("local", m) for n, m in local.items()}, **{n: ("server", u) for n, u in servers.items()}}


def check_teachers(plan: dict, train_dataset, eval_dataset, args) -> None:
    """Several teachers: what the datasets and the loss must offer before any model loads."""
    names = list(plan)
    for dataset, where in ((train_dataset, "train_dataset"), (eval_dataset, "eval_dataset")):
        check_teacher_column(dataset, where, args.teacher_id_column, names)
    local = [name for name, (kind, _) in plan.items() if kind == "local"]
    if args.loss_type == "topk_reverse_kl" and local:
        raise ValueError(f"loss_type='topk_reverse_kl' reads a teacher server's top-k, but the teacher(s) {local} "
                         f"are local models. Use loss_type='sampled' (every teacher can give it), or serve them.")
    if args.teacher_model_init_kwargs is not None and not any(isinstance(plan[n][1], str) for n in local):
        raise ValueError(f"teacher_model_init_kwargs={args.teacher_model_init_kwargs!r}, but no teacher is loaded "
                         f"from a path or Hub id. Drop teacher_model_init_kwargs, or pass a teacher's path.")


def load_teachers(plan: dict, args) -> dict:
    """`{name: connected server client | loaded local model}`, before the student is loaded: the servers are checked
    first, so an unreachable URL fails in a second."""
    loaded = {name: connect_teacher_server(args, what) if kind == "server" else None
              for name, (kind, what) in plan.items()}
    loaded.update({name: load_teacher(what, args) for name, (kind, what) in plan.items() if kind == "local"})
    return loaded


def attach(trainer, name: str | None, kind: str, loaded) -> Teacher:
    """A loaded teacher (or connected server) prepared for `trainer`, after TRL's constructor ran; an error names the
    teacher when there are several."""
    try:
        if kind == "local":
            model, shared = attach_teacher(trainer, loaded)
            return Teacher(name, model=model, shared_vocab_size=shared)
        # ids past the tokenizer are suppressed; the server's top-k ids past the student's head go to the tail
        return Teacher(name, server=loaded, shared_vocab_size=attach_teacher_server(trainer, loaded))
    except ValueError as error:
        if name is None:
            raise
        raise ValueError(f"Teacher {name!r}: {error}") from error


def has_server(teachers: list[Teacher]) -> bool:
    """Whether any teacher of the run is behind a server (and so `teacher/scored_tokens` is logged)."""
    return any(teacher.server is not None for teacher in teachers)


def check_teacher_column(dataset, where: str, column: str, names: list[str]) -> None:
    """Fail at construction when `dataset` (or any dataset of a dict of them) lacks `column` or, map-style, names a
    teacher not in `names`; a stream is checked on its first row (later rows when a batch reads them)."""
    if dataset is None:
        return
    if isinstance(dataset, dict):
        for key, value in dataset.items():
            check_teacher_column(value, f"{where}[{key!r}]", column, names)
        return
    if isinstance(dataset, IterableDataset):
        row = next(iter(dataset.take(1)), None)
        columns = list(row) if row is not None else []
        values = [row[column]] if row is not None and column in row else []
    else:
        columns = list(getattr(dataset, "column_names", None) or [])
        values = list(dict.fromkeys(dataset[column])) if column in columns else []
    if column not in columns:
        raise ValueError(
            f"{where} has no {column!r} column (its columns: {columns}), but {len(names)} teachers are given "
            f"({names}): each row must name its teacher there. Add the column (e.g. dataset.add_column({column!r}, "
            f"[...])), or set teacher_id_column to the column that names them.")
    unknown = [v for v in values if v not in names]
    if unknown:
        raise ValueError(f"{where}[{column!r}] names the teacher {unknown[0]!r}, which is not one of the teachers "
                         f"given ({names}). Add a teacher of that name, or fix the rows that name it.")


def teacher_indices(rows: list[dict], column: str, names: list[str]) -> list[int]:
    """Each row's teacher as an index into `names`; raises on a row without the column or naming another teacher
    (a stream's rows are only seen here)."""
    index = {name: i for i, name in enumerate(names)}
    out = []
    for row in rows:
        if column not in row:
            raise ValueError(f"A row has no {column!r} column (its keys: {list(row)}), but the run has several teachers "
                             f"({names}) and each row must name its own there.")
        value = row[column]
        if value not in index:
            raise ValueError(f"A row names the teacher {value!r} in {column!r}, which is not one of the teachers given "
                             f"({names}). Add a teacher of that name, or fix the rows that name it.")
        out.append(index[value])
    return out


def describe(teacher) -> str:
    return repr(teacher) if isinstance(teacher, str) else f"a {type(teacher).__name__}"
