"""A teacher behind an HTTP server: the client that asks it for the log-probs of sequences the student generated.

The server is vLLM's OpenAI-compatible one (`vllm serve TEACHER`) or the loopback server in
[`horizon_opd.teacher_server`]. Each request posts prompt + completion token ids to `/v1/completions` with
`max_tokens=1` and `prompt_logprobs=k`, as TRL's `VLLMClient.get_sequence_logprobs` does, and reads back, at every
completion position, the teacher's log-prob of the token actually there and the teacher's top-k tokens. The response is
parsed by TRL's own `VLLMClient._format_sequence_logprobs`, which runs without vLLM installed (only `VLLMClient()`
itself refuses to start without it); the trainer side needs nothing beyond the standard library's `urllib`.

Temperature: the values are log softmax(teacher logits) at temperature 1. vLLM computes `prompt_logprobs` from the raw
logits and ignores the request's `temperature` (vllm-project/vllm#37082 proposes a separate
`prompt_logprobs_temperature`), and log softmax(z / T) at the top-k cannot be recovered from top-k values of
log softmax(z) (it needs the logsumexp of z / T over the whole vocabulary). A trainer with a remote teacher must
therefore use `temperature=1.0` for the loss.

Vocabulary and length ([`attach_teacher_server`], at trainer construction): the ids both sides share are the
tokenizer's, `0..len(tokenizer)-1`. Ids past it are padding rows of a head (Qwen2.5's 151936 or 152064 rows for a
151665-token tokenizer): no text maps to them, and a server need not score them (vLLM accepts an id only below
max(its tokenizer's size, its model's vocab_size), and its `/v1/models` reports neither). So a student head larger
than the tokenizer has those rows suppressed in generation and left out of its softmax in the loss, as a local
teacher's smaller head does. A server that reports its head size (`vocab_size` in `/v1/models`, as the loopback
server does) must cover the tokenizer. vLLM's `/v1/models` reports `max_model_len`: a prompt + completion must fit in
it with one token to spare, which is checked against `max_completion_length` and the longest prompt.
"""

import http.client
import json
import math
import threading
import time
import urllib.error
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

# HTTP statuses worth another attempt: the server is overloaded, restarting or behind a proxy that lost it. Any other
# 4xx is a bad request (e.g. `prompt_logprobs` above the server's `--max-logprobs`) that a retry would repeat.
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class TeacherServerError(RuntimeError):
    """The teacher server could not score a batch; the message names the URL and the last error."""


@dataclass(frozen=True)
class TeacherScores:
    """Teacher log-probs at the completion positions of a batch, in the completion's (B, K) layout.

    `mask[b, j]` is True where position j of completion b was scored; elsewhere `actual_logprobs` is 0, `topk_ids` 0 and
    `topk_logprobs` -inf (the padding TRL's parser uses), so a padded slot never contributes to a loss.
    """

    actual_logprobs: torch.Tensor  # (B, K) float32: log q(y_j | x, y_<j) of the token y_j in the completion
    topk_ids: torch.Tensor  # (B, K, k) int64: the teacher's k most likely tokens, most likely first
    topk_logprobs: torch.Tensor  # (B, K, k) float32: their log-probs; -inf where the server returned fewer than k
    mask: torch.Tensor  # (B, K) bool

    def restrict_vocab(self, vocab_size: int) -> "TeacherScores":
        """Drop top-k entries whose id is outside the student's vocabulary (a teacher's padding rows), so their mass
        falls into the tail bucket of [`topk_reverse_kl_per_token`] instead of indexing past the student's head."""
        outside = self.topk_ids >= vocab_size
        return TeacherScores(
            actual_logprobs=self.actual_logprobs,
            topk_ids=self.topk_ids.masked_fill(outside, 0),
            topk_logprobs=self.topk_logprobs.masked_fill(outside, -math.inf),
            mask=self.mask,
        )


class RemoteTeacher:
    """
    Client for a teacher served over HTTP (vLLM's `/v1/completions` with `prompt_logprobs`).

    Args:
        base_url (`str`):
            The server's root, e.g. `"http://127.0.0.1:8000"` (a trailing `/v1` is accepted and dropped).
        model (`str` or `None`, *optional*):
            The served model name sent with each request. `None` asks the server's `/v1/models` once.
        top_k (`int`, *optional*, defaults to `20`):
            Top-k log-probs asked for at each position (`prompt_logprobs`). vLLM caps it at its `--max-logprobs`
            (default 20). `0` returns only the actual token's log-prob (enough for the sampled-token loss).
        timeout (`float`, *optional*, defaults to `120.0`):
            Seconds one HTTP request may take (connect and read) before it counts as failed.
        max_retries (`int`, *optional*, defaults to `3`):
            Further attempts after a failed request (connection error, timeout, HTTP 408/429/5xx), with exponential
            back-off. A batch whose request still fails raises [`TeacherServerError`]; no partial result is returned.
        retry_backoff (`float`, *optional*, defaults to `1.0`):
            Seconds before the first retry, doubled for each further one.
        chunk_size (`int`, *optional*, defaults to `16`):
            Sequences per request; a batch is split into chunks sent concurrently. `0` sends the batch in one request.
        max_concurrent_requests (`int`, *optional*, defaults to `4`):
            Chunks in flight at once.
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        top_k: int = 20,
        timeout: float = 120.0,
        max_retries: int = 3,
        retry_backoff: float = 1.0,
        chunk_size: int = 16,
        max_concurrent_requests: int = 4,
    ):
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url={base_url!r} is not an http(s) URL; pass e.g. 'http://127.0.0.1:8000'.")
        for name, value, low in (
            ("top_k", top_k, 0),
            ("max_retries", max_retries, 0),
            ("chunk_size", chunk_size, 0),
            ("max_concurrent_requests", max_concurrent_requests, 1),
        ):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} must be an integer >= {low}.")
        if not timeout > 0:
            raise ValueError(f"timeout={timeout!r} must be a positive number of seconds.")
        if retry_backoff < 0:
            raise ValueError(f"retry_backoff={retry_backoff!r} must be >= 0 seconds.")
        url = base_url.rstrip("/")
        self.base_url = url[: -len("/v1")] if url.endswith("/v1") else url
        self._model = model
        self._entry = None  # the served model's /v1/models entry, asked once
        self.top_k = top_k
        self.timeout = timeout
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.chunk_size = chunk_size
        self.max_concurrent_requests = max_concurrent_requests
        # Costs of the run so far: completion tokens scored and HTTP requests sent (retries included).
        self.scored_tokens = 0
        self.requests_sent = 0
        self._lock = threading.Lock()

    # ----------------------------------------------------------------------------------------------- HTTP
    def _request(self, method: str, path: str, payload: dict | None = None):
        """One JSON request, retried on transient failures; raises `TeacherServerError` naming the URL."""
        url = f"{self.base_url}{path}"
        data = None if payload is None else json.dumps(payload).encode()
        attempts = 1 + self.max_retries
        for attempt in range(attempts):
            with self._lock:
                self.requests_sent += 1
            headers = {"Content-Type": "application/json"}
            request = urllib.request.Request(url, data=data, method=method, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    body = response.read()
                return json.loads(body) if body else None
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode(errors="replace")[:500]
                error = f"HTTP {exc.code} {exc.reason}: {detail}"
                if exc.code not in RETRYABLE_STATUSES:
                    raise TeacherServerError(f"Teacher server {url} refused the request: {error}") from exc
            except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, resets, truncated answers
                reason = getattr(exc, "reason", exc)
                error = f"timed out after {self.timeout}s" if isinstance(reason, TimeoutError) else repr(reason)
            except json.JSONDecodeError as exc:
                raise TeacherServerError(f"Teacher server {url} answered with invalid JSON: {exc}") from exc
            if attempt + 1 < attempts:
                time.sleep(self.retry_backoff * 2**attempt)
        raise TeacherServerError(f"Teacher server {url} failed {attempts} attempt(s); last error: {error}")

    def health(self) -> None:
        """GET `/health` once (no retries); raises `TeacherServerError` if the server does not answer 200."""
        url = f"{self.base_url}/health"
        try:
            with urllib.request.urlopen(url, timeout=self.timeout):
                pass
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise TeacherServerError(
                f"No teacher server answers at {url} ({getattr(exc, 'reason', exc)!r}). Start one with `vllm serve "
                f"TEACHER --port PORT` or `python -m horizon_opd.teacher_server --model TEACHER --port PORT`."
            ) from exc

    @property
    def model(self) -> str:
        """The served model name: the one given, else the first of the server's `/v1/models`."""
        if self._model is None:
            self._model = self.model_entry()["id"]
        return self._model

    @property
    def max_model_len(self) -> int | None:
        """The longest sequence the server takes (`max_model_len` in `/v1/models`, which vLLM reports); None if the
        server does not say. A scored sequence must be shorter than it, as vLLM generates one token."""
        return _positive_int(self.model_entry().get("max_model_len"))

    @property
    def vocab_size(self) -> int | None:
        """The ids the served model can score (`vocab_size` in `/v1/models`: the loopback server reports its head's
        rows; vLLM reports nothing, so None)."""
        return _positive_int(self.model_entry().get("vocab_size"))

    def model_entry(self) -> dict:
        """The served model's entry in `/v1/models`, asked once: the one with the given name, else the first listed
        (empty when a given name is not listed, e.g. a LoRA adapter served by another name)."""
        if self._entry is None:
            models = (self._request("GET", "/v1/models") or {}).get("data") or []
            if not models:
                raise TeacherServerError(f"Teacher server {self.base_url}/v1/models lists no model.")
            named = [entry for entry in models if entry.get("id") == self._model]
            self._entry = named[0] if named else ({} if self._model is not None else models[0])
        return self._entry

    # ----------------------------------------------------------------------------------------------- scoring
    def score(self, prompts: list[list[int]], completions: list[list[int]]) -> TeacherScores:
        """Teacher log-probs at every token of each completion, given its prompt; `(B, max completion length)`."""
        if len(prompts) != len(completions):
            raise ValueError(
                f"{len(prompts)} prompts but {len(completions)} completions; pass one prompt per completion."
            )
        if not prompts:
            raise ValueError("score() got an empty batch.")
        if any(len(p) == 0 for p in prompts):
            # Position 0 has no prefix, so the teacher cannot score a completion token there.
            raise ValueError("Every prompt needs at least one token (e.g. a BOS) before its completion.")
        sequences = [[int(t) for t in p] + [int(t) for t in c] for p, c in zip(prompts, completions, strict=True)]
        prompt_lengths = [len(p) for p in prompts]
        chunk = self.chunk_size or len(sequences)
        chunks = [(sequences[i : i + chunk], prompt_lengths[i : i + chunk]) for i in range(0, len(sequences), chunk)]
        model = self.model
        with ThreadPoolExecutor(max_workers=min(self.max_concurrent_requests, len(chunks))) as pool:
            # `map` re-raises the first chunk's error here; the whole batch fails, none of it is returned.
            parsed = [row for rows in pool.map(lambda c: self._score_chunk(model, *c), chunks) for row in rows]
        width = max(len(c) for c in completions)
        scores = _to_tensors(parsed, width, self.top_k)
        missing = scores.mask & ~torch.isfinite(scores.actual_logprobs)
        if missing.any():
            raise TeacherServerError(
                f"Teacher server {self.base_url} returned no log-prob for the actual token at {int(missing.sum())} of "
                f"{int(scores.mask.sum())} completion positions; the sampled-token loss needs every one."
            )
        with self._lock:
            self.scored_tokens += int(scores.mask.sum())
        return scores

    def score_batch(
        self,
        prompt_ids: torch.Tensor,  # (B, P), left-padded
        prompt_mask: torch.Tensor,  # (B, P)
        completion_ids: torch.Tensor,  # (B, K), right-padded
        completion_mask: torch.Tensor,  # (B, K)
    ) -> TeacherScores:
        """[`score`] on TRL's padded batch layout (`inputs["prompt_ids"]`, ...). Only the tokens under the masks are
        sent; the result has the completion's (B, K) shape, with `mask` equal to `completion_mask`."""
        if completion_ids.shape != completion_mask.shape or prompt_ids.shape != prompt_mask.shape:
            raise ValueError(
                f"ids and masks differ in shape: prompt {tuple(prompt_ids.shape)} vs {tuple(prompt_mask.shape)}, "
                f"completion {tuple(completion_ids.shape)} vs {tuple(completion_mask.shape)}."
            )
        completion_mask = completion_mask.bool().cpu()
        lengths = completion_mask.sum(1)
        if not torch.equal(completion_mask, torch.arange(completion_mask.size(1)) < lengths[:, None]):
            raise ValueError("completion_mask must be a prefix of ones per row (TRL masks only after the first EOS).")
        prompt_mask = prompt_mask.bool().cpu()
        prompts = [row[mask].tolist() for row, mask in zip(prompt_ids.cpu(), prompt_mask, strict=True)]
        completions = [row[:n].tolist() for row, n in zip(completion_ids.cpu(), lengths.tolist(), strict=True)]
        scores = self.score(prompts, completions)
        pad = completion_ids.size(1) - scores.mask.size(1)  # `score` is as wide as the longest completion
        if pad:
            scores = TeacherScores(
                actual_logprobs=torch.nn.functional.pad(scores.actual_logprobs, (0, pad)),
                topk_ids=torch.nn.functional.pad(scores.topk_ids, (0, 0, 0, pad)),
                topk_logprobs=torch.nn.functional.pad(scores.topk_logprobs, (0, 0, 0, pad), value=-math.inf),
                mask=torch.nn.functional.pad(scores.mask, (0, pad)),
            )
        return scores

    def _score_chunk(self, model: str, sequences: list[list[int]], prompt_lengths: list[int]) -> list[dict]:
        payload = {
            "model": model,
            "prompt": sequences,
            "max_tokens": 1,
            "temperature": 1.0,  # vLLM ignores it for prompt_logprobs (see the module docstring)
            "prompt_logprobs": self.top_k,
        }
        url = f"{self.base_url}/v1/completions"
        choices = self._request("POST", "/v1/completions", payload).get("choices") or []
        if len(choices) != len(sequences):
            raise TeacherServerError(
                f"Teacher server {url} returned {len(choices)} choices for {len(sequences)} prompts."
            )
        choices = sorted(choices, key=lambda choice: choice.get("index", 0))
        rows = []
        for choice, sequence, prompt_length in zip(choices, sequences, prompt_lengths, strict=True):
            if len(choice.get("prompt_logprobs") or []) != len(sequence):
                raise TeacherServerError(
                    f"Teacher server {url} returned prompt_logprobs for {len(choice.get('prompt_logprobs') or [])} "
                    f"positions of a {len(sequence)}-token sequence (was it truncated by the server's max_model_len?)."
                )
            rows.append(format_sequence_logprobs(choice, sequence, prompt_length, self.top_k))
        return rows


def connect_teacher_server(args, url: str) -> RemoteTeacher:
    """The client for the teacher server at `url` (one of `args.teacher_server_urls()`) with the settings of a
    [`HorizonOPDConfig`], checked to answer `/health` and to name its served model; raises [`TeacherServerError`]
    naming the URL otherwise. The sampled-token losses ask for no top-k (`prompt_logprobs=0`: the actual tokens'
    log-probs only), `topk_reverse_kl` for `loss_top_k`."""
    client = RemoteTeacher(
        url,
        top_k=args.loss_top_k if args.loss_type == "topk_reverse_kl" else 0,
        timeout=args.teacher_server_timeout,
        max_retries=args.teacher_server_max_retries,
        chunk_size=args.teacher_server_chunk_size,
    )
    client.health()
    _ = client.model  # resolved once now, so a server without a model fails at construction, not mid-training
    return client


# Prompts of each dataset tokenized at construction to find the longest one (the server's max_model_len must fit it).
PROMPT_SCAN_LIMIT = 1024


def attach_teacher_server(trainer, client: RemoteTeacher) -> int | None:
    """Check a teacher server against `trainer` after TRL's constructor ran, as [`attach_teacher`] does a local
    teacher, and return the vocabulary the student's head is sliced to in the loss (None: the whole head).

    - A server that reports a `vocab_size` below the tokenizer's size cannot score every token: refused.
    - A server `max_model_len` that the longest prompt + `max_completion_length` + 1 exceeds: refused (both named).
    - A student head larger than the tokenizer: its rows past the tokenizer are suppressed in generation (the shared
      vocabulary is `len(tokenizer)`, see the module docstring). vLLM generation cannot suppress them: refused when the
      server reports a smaller head than the student's (as with a local teacher), else warned about.
    """
    tokenizer_size = len(trainer._tokenizer)
    student_vocab = trainer.model.config.get_text_config().vocab_size
    server_vocab = client.vocab_size
    if server_vocab is not None and server_vocab < tokenizer_size:
        raise ValueError(
            f"The teacher server {client.base_url} serves {client.model!r}, which scores ids below {server_vocab}, "
            f"but the tokenizer has {tokenizer_size} tokens: the teacher cannot score every token, so the two do not "
            f"share a tokenizer. Distillation compares next-token distributions and needs one: serve a teacher from "
            f"the student's family (sizes may differ only by padding rows past the tokenizer), or use TRL's GOLD "
            f"trainer for cross-tokenizer distillation."
        )
    check_max_model_len(trainer, client)
    if student_vocab <= tokenizer_size:
        return None
    if trainer.use_vllm:
        if server_vocab is not None and student_vocab > server_vocab:
            raise ValueError(
                f"The student's vocab_size {student_vocab} exceeds the {server_vocab} ids the teacher server "
                f"{client.base_url} scores, and vLLM generation cannot be told to avoid the student's padding ids. "
                f"Use use_vllm=False, or a teacher with at least the student's vocab_size."
            )
        if server_vocab is None:
            warnings.warn(
                f"The student's head has {student_vocab} rows but the tokenizer {tokenizer_size} tokens, and vLLM "
                f"generation cannot be told to avoid the padding ids past the tokenizer. The teacher server "
                f"{client.base_url} does not report which ids it scores: a sampled padding id past its model's "
                f"vocab_size fails that step, naming the URL. use_vllm=False suppresses them.",
                stacklevel=3,
            )
        return None
    # Ids past the tokenizer are no text's and need not be scored by the server: never sample them, and leave them
    # out of the student's softmax in the loss, as for a local teacher with the smaller head.
    from .local import suppress_in_generation

    suppress_in_generation(trainer, range(tokenizer_size, student_vocab))
    return tokenizer_size


def check_max_model_len(trainer, client: RemoteTeacher) -> None:
    """Refuse a server whose `max_model_len` (when reported) is too short for the longest prompt (of the first
    `PROMPT_SCAN_LIMIT` of each dataset) + `max_completion_length` + 1 (vLLM needs room for the one token it
    generates); the server would refuse those sequences mid-training."""
    limit = client.max_model_len
    if limit is None:
        return
    completion = trainer.args.max_completion_length
    prompt, where = _longest_prompt(trainer)
    needed = prompt + completion + 1
    if needed <= limit:
        return
    fixes = [f"serve the teacher with a longer context (vllm serve ... --max-model-len {needed} or more)"]
    if limit - prompt - 1 >= 1:
        fixes.append(f"set max_completion_length <= {limit - prompt - 1}")
    if where is not None:
        fixes.append("shorten the prompts")
    part = f"the longest prompt ({prompt} tokens: {where})" if where else "a 1-token prompt"
    raise ValueError(
        f"The teacher server {client.base_url} serves {client.model!r} with max_model_len {limit}, but scoring a "
        f"rollout needs up to {needed} tokens: {part} + max_completion_length {completion} + 1 (the server scores a "
        f"sequence only if one more token fits). Either {', or '.join(fixes)}."
    )


def _longest_prompt(trainer) -> tuple[int, str | None]:
    """Tokens of the longest prompt (tokenized as TRL does for generation) among the first `PROMPT_SCAN_LIMIT` of
    the train and eval datasets (map-style or streamed), and which one it is; `(1, None)` when none can be measured
    (no dataset, or a VLM, whose prompts grow with their images)."""
    from trl import DistillationTrainer

    from ..data import first_prompts

    if getattr(trainer, "_is_vlm", False):
        return 1, None
    eval_dataset = trainer.eval_dataset
    datasets = [("train_dataset", trainer.train_dataset)] + (
        [(f"eval_dataset[{key!r}]", value) for key, value in eval_dataset.items()]
        if isinstance(eval_dataset, dict) else [("eval_dataset", eval_dataset)]
    )
    longest, where = 1, None
    for name, dataset in datasets:
        head = first_prompts(dataset, PROMPT_SCAN_LIMIT)  # a stream's first rows too: it is peeked, not consumed
        for start in range(0, len(head), 64):
            prompts = head[start:start + 64]
            # TRL's tokenization of fresh prompts, not a subclass's (which may read state not built yet)
            lengths = [len(ids) for ids in DistillationTrainer._tokenize_prompts(trainer, prompts)[0]]
            if max(lengths) > longest:
                longest, where = max(lengths), f"prompt {start + lengths.index(max(lengths))} of {name}"
    return longest, where


def _positive_int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def format_sequence_logprobs(choice: dict, sequence: list[int], prompt_length: int, top_k: int) -> dict:
    """TRL's parser of one vLLM choice: `logprobs`/`logprob_token_ids` (T, k) sorted by rank and padded with -inf/0,
    `actual_logprobs`/`actual_token_ids` (T, 1) for the completion positions `prompt_length..len(sequence)-1`."""
    from trl.generation.vllm_client import VLLMClient

    return VLLMClient._format_sequence_logprobs(choice, sequence, prompt_length, top_k)


def _to_tensors(parsed: list[dict], width: int, top_k: int) -> TeacherScores:
    batch = len(parsed)
    actual = torch.zeros(batch, width, dtype=torch.float32)
    ids = torch.zeros(batch, width, top_k, dtype=torch.long)
    logprobs = torch.full((batch, width, top_k), -math.inf, dtype=torch.float32)
    mask = torch.zeros(batch, width, dtype=torch.bool)
    for b, row in enumerate(parsed):
        n = len(row["actual_logprobs"])
        if n == 0:
            continue
        actual[b, :n] = torch.tensor([values[0] for values in row["actual_logprobs"]], dtype=torch.float32)
        if top_k:
            ids[b, :n] = torch.tensor(row["logprob_token_ids"], dtype=torch.long)
            logprobs[b, :n] = torch.tensor(row["logprobs"], dtype=torch.float32)
        mask[b, :n] = True
    return TeacherScores(actual_logprobs=actual, topk_ids=ids, topk_logprobs=logprobs, mask=mask)
