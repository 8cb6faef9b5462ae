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
"""

import http.client
import json
import math
import threading
import time
import urllib.error
import urllib.request
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
            models = self._request("GET", "/v1/models")["data"]
            if not models:
                raise TeacherServerError(f"Teacher server {self.base_url}/v1/models lists no model.")
            self._model = models[0]["id"]
        return self._model

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


def connect_teacher_server(args) -> RemoteTeacher:
    """The client a [`HorizonOPDConfig`] with `teacher_model_server_url` describes, checked to answer `/health` and
    to name its served model; raises [`TeacherServerError`] naming the URL otherwise. The sampled-token losses ask
    for no top-k (`prompt_logprobs=0`: the actual tokens' log-probs only), `topk_reverse_kl` for `loss_top_k`."""
    client = RemoteTeacher(
        args.teacher_model_server_url,
        top_k=args.loss_top_k if args.loss_type == "topk_reverse_kl" else 0,
        timeout=args.teacher_server_timeout,
        max_retries=args.teacher_server_max_retries,
        chunk_size=args.teacher_server_chunk_size,
    )
    client.health()
    _ = client.model  # resolved once now, so a server without a model fails at construction, not mid-training
    return client


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
