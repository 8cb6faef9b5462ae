"""A loopback teacher server: a local Hugging Face causal LM behind vLLM's `/v1/completions` + `prompt_logprobs` API.

For tests and for users without a GPU: [`RemoteTeacher`] talks to it exactly as to `vllm serve`. Only what the
distillation client needs is implemented, in vLLM's response format (the fields TRL's `VLLMClient` parser reads):

- `POST /v1/completions` with `prompt` = token ids (one list, or a list of lists) or strings (if a tokenizer is
  given), `max_tokens=1` and `prompt_logprobs=k`. Each choice's `prompt_logprobs` has one entry per prompt token:
  `None` for the first, then `{"<token id>": {"logprob", "rank", "decoded_token"}}` holding the teacher's top-k tokens
  (ranks 1..k) and the token actually at that position with its rank in the vocabulary. The values are
  log softmax(logits) at temperature 1 whatever the request's `temperature`, as in vLLM. The one generated token is
  the greedy one.
- `GET /health` (200, empty body) and `GET /v1/models`: the served name and `max_model_len` (the model's
  `max_position_embeddings`) as vLLM reports them, plus `vocab_size`, which vLLM does not report: the rows of the
  model's head, i.e. the ids it can score ([`RemoteTeacher.vocab_size`]).

    python -m horizon_opd.teacher_server --model PATH --port 8000   # teacher_model_server_url="http://127.0.0.1:8000"

In Python: `with serve_teacher(model, tokenizer, port=0) as server: ... server.url ...` (port 0 picks a free port).
It serves on the standard library's `ThreadingHTTPServer`; forward passes are serialised by a lock. Stopping it
(`close`, or the end of the `with` block) waits for the requests in flight to be answered.
"""

import argparse
import json
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


@dataclass
class ServerFaults:
    """Testing only (not exposed by the CLI): make `/v1/completions` misbehave to exercise a client's retries.

    The first `fail_first` completion requests are answered with HTTP `status`; every completion request first sleeps
    `delay_s` seconds (longer than the client's timeout gives a timeout)."""

    fail_first: int = 0
    status: int = 500
    delay_s: float = 0.0


class _BadRequest(ValueError):
    pass


class TeacherServer:
    """A started loopback server (returned by [`serve_teacher`]); a context manager that stops it on exit.

    Counters for tests and cost measurements: `completion_requests` (POSTs to `/v1/completions`, failed ones included),
    `scored_sequences` and `scored_positions` (prompt positions whose log-probs were returned)."""

    def __init__(self, model, tokenizer=None, host="127.0.0.1", port=0, model_name=None, batch_size=8, faults=None):
        if isinstance(model, str):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model_name = model_name or model
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(model)
            model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.model_name = model_name or getattr(model.config, "_name_or_path", None) or "teacher"
        self.batch_size = batch_size
        self.faults = faults or ServerFaults()
        self.max_length = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        # Reported by /v1/models (None leaves it out, as vLLM does); the ids the head can score.
        self.vocab_size = self.model.get_output_embeddings().weight.size(0)
        self.completion_requests = 0
        self.scored_sequences = 0
        self.scored_positions = 0
        self._stats_lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._decoded: dict[int, str] = {}
        self._httpd = ThreadingHTTPServer((host, port), _handler_for(self))
        # Handler threads are joined by `close` (server_close), not abandoned as daemons: a daemon thread still inside
        # a forward pass when the interpreter exits is ended there when it takes the GIL back, which can abort the
        # process. A stalled client cannot hold `close` up for longer than REQUEST_IO_TIMEOUT_S (the handler's socket
        # timeout).
        self._httpd.daemon_threads = False
        self._httpd.block_on_close = True
        self.host, self.port = self._httpd.server_address[:2]
        self._thread = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "TeacherServer":
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name=f"teacher-server-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and wait for the requests in flight to be answered (or dropped by their client)."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ----------------------------------------------------------------------------------------------- scoring
    def complete(self, request: dict) -> dict:
        """The `/v1/completions` response for one request body (raises `_BadRequest` on what it cannot serve)."""
        prompts = self._token_ids(request.get("prompt"))
        top_k = request.get("prompt_logprobs")
        vocab_size = self.model.get_output_embeddings().weight.size(0)
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < -1):
            raise _BadRequest(f"prompt_logprobs must be an integer >= -1 or null, got {top_k!r}")
        top_k = vocab_size if top_k == -1 else top_k
        if request.get("max_tokens", 16) != 1:
            raise _BadRequest("this loopback server only scores prompts: send max_tokens=1")
        if request.get("n", 1) != 1:
            raise _BadRequest("n must be 1")
        for ids in prompts:
            if not ids:
                raise _BadRequest("empty prompt")
            if min(ids) < 0 or max(ids) >= vocab_size:
                raise _BadRequest(f"token ids must lie in [0, {vocab_size})")
            if self.max_length is not None and len(ids) + 1 > self.max_length:
                raise _BadRequest(f"prompt of {len(ids)} tokens exceeds max_model_len {self.max_length}")
        choices = []
        for start in range(0, len(prompts), self.batch_size):
            scored = self._score(prompts[start : start + self.batch_size], top_k)
            for offset, (next_token, prompt_logprobs) in enumerate(scored):
                choices.append({
                    "index": start + offset,
                    "text": self._decode(next_token),
                    "logprobs": None,
                    "finish_reason": "length",
                    "stop_reason": None,
                    "prompt_logprobs": prompt_logprobs,
                })
        num_prompt_tokens = sum(len(ids) for ids in prompts)
        with self._stats_lock:
            self.scored_sequences += len(prompts)
            self.scored_positions += sum(len(ids) - 1 for ids in prompts) if top_k is not None else 0
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": {"prompt_tokens": num_prompt_tokens, "completion_tokens": len(prompts),
                      "total_tokens": num_prompt_tokens + len(prompts)},
        }

    def _token_ids(self, prompt) -> list[list[int]]:
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise _BadRequest("prompt must be token ids, a list of token-id lists, or strings")
        out = []
        for item in prompt:
            if isinstance(item, str):
                if self.tokenizer is None:
                    raise _BadRequest("text prompts need a tokenizer; send token ids")
                item = self.tokenizer(item, add_special_tokens=False)["input_ids"]
            if not isinstance(item, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in item):
                raise _BadRequest("prompt must be token ids, a list of token-id lists, or strings")
            out.append(item)
        return out

    @torch.no_grad()
    def _score(self, prompts: list[list[int]], top_k: int | None):
        device = self.model.get_output_embeddings().weight.device
        width = max(len(ids) for ids in prompts)
        # Right padding with an attention mask: a causal model's positions 0..len-1 see exactly the unpadded sequence.
        input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
        attention_mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for b, ids in enumerate(prompts):
            input_ids[b, : len(ids)] = torch.tensor(ids)
            attention_mask[b, : len(ids)] = 1
        with self._model_lock:
            logits = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()  # (b, T, V)
        results = []
        for b, ids in enumerate(prompts):
            next_token = int(logprobs[b, len(ids) - 1].argmax())
            if top_k is None:
                results.append((next_token, None))
                continue
            rows = logprobs[b, : len(ids) - 1]  # (T-1, V): row t-1 predicts token t
            actual = torch.tensor(ids[1:])
            actual_lp = rows.gather(1, actual[:, None])  # (T-1, 1)
            actual_rank = ((rows > actual_lp).sum(1) + 1).tolist()
            top_lp, top_ids = rows.topk(min(top_k, rows.size(1)), dim=1)  # (T-1, k), most likely first
            entries = [None]
            for t, (token, lp, rank, values, tokens) in enumerate(
                zip(ids[1:], actual_lp[:, 0].tolist(), actual_rank, top_lp.tolist(), top_ids.tolist(), strict=True)
            ):
                entry = {str(token): {"logprob": lp, "rank": rank, "decoded_token": self._decode(token)}}
                for rank_k, (value, other) in enumerate(zip(values, tokens, strict=True), start=1):
                    item = {"logprob": value, "rank": rank_k, "decoded_token": self._decode(other)}
                    entry.setdefault(str(other), item)
                entries.append(entry)
            results.append((next_token, entries))
        return results

    def _decode(self, token: int) -> str:
        if self.tokenizer is None:
            return ""
        if token not in self._decoded:
            self._decoded[token] = self.tokenizer.decode([token])
        return self._decoded[token]

    def _inject_fault(self) -> int | None:
        """HTTP status to fail this completion request with (testing only), after the configured delay."""
        with self._stats_lock:
            self.completion_requests += 1
            number = self.completion_requests
        if self.faults.delay_s:
            time.sleep(self.faults.delay_s)
        return self.faults.status if number <= self.faults.fail_first else None


# Seconds a handler waits on its socket (reading a request, writing an answer) before it drops the connection.
REQUEST_IO_TIMEOUT_S = 60.0


def _handler_for(server: TeacherServer):
    class Handler(BaseHTTPRequestHandler):
        timeout = REQUEST_IO_TIMEOUT_S

        def log_message(self, format, *args):  # requests are not logged: a training run sends thousands
            pass

        def _send(self, status: int, body: dict | None):
            data = b"" if body is None else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str):
            kind = "BadRequestError" if status == 400 else "InternalServerError"
            self._send(status, {"object": "error", "message": message, "type": kind, "param": None, "code": status})

        def do_GET(self):
            if self.path == "/health":
                self._send(200, None)
            elif self.path == "/v1/models":
                entry = {"id": server.model_name, "object": "model", "created": int(time.time()),
                         "owned_by": "horizon-opd", "root": server.model_name, "max_model_len": server.max_length}
                if server.vocab_size is not None:
                    entry["vocab_size"] = server.vocab_size
                self._send(200, {"object": "list", "data": [entry]})
            else:
                self._error(404, f"no route {self.path}")

        def do_POST(self):
            if self.path != "/v1/completions":
                self._error(404, f"no route {self.path}")
                return
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            except (ValueError, json.JSONDecodeError) as exc:
                self._error(400, f"invalid JSON body: {exc}")
                return
            try:
                status = server._inject_fault()
                if status is not None:
                    self._error(status, "injected fault (testing)")
                    return
                try:
                    response = server.complete(body)
                except _BadRequest as exc:
                    self._error(400, str(exc))
                except Exception as exc:  # a server must answer, not drop the connection
                    self._error(500, f"{type(exc).__name__}: {exc}")
                else:
                    self._send(200, response)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (e.g. its timeout); nothing to answer

    return Handler


def serve_teacher(model, tokenizer=None, host: str = "127.0.0.1", port: int = 0, *, model_name: str | None = None,
                  batch_size: int = 8, faults: ServerFaults | None = None) -> TeacherServer:
    """Serve `model` (a causal LM or a local path) on http://host:port in a background thread and return the started
    [`TeacherServer`]; use it as a context manager to stop it. `port=0` picks a free port (`server.port`).
    `faults` is for tests only."""
    return TeacherServer(model, tokenizer, host, port, model_name, batch_size, faults).start()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="local path (or Hub id) of the teacher causal LM")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--served-model-name", default=None, help="name reported by /v1/models (default: --model)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    args = parser.parse_args(argv)
    server = TeacherServer(args.model, host=args.host, port=args.port, model_name=args.served_model_name,
                           batch_size=args.batch_size)
    print(f"Serving {server.model_name} on {server.url} (POST /v1/completions, GET /health, GET /v1/models)",
          flush=True)
    try:
        server._httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server._httpd.server_close()


if __name__ == "__main__":
    main()
