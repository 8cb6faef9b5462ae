"""A Hugging Face Hub stand-in on 127.0.0.1 serving the endpoints `huggingface_hub` (2.4) uses to upload a folder.

Point the real client at it with `HF_ENDPOINT=<hub.url>` and `HF_HUB_DISABLE_XET=1` (the Xet transfer path needs the
real storage backend). Served:

  GET  /api/whoami-v2                               the token's user
  POST /api/repos/create                            create_repo
  POST /api/validate-yaml                           README.md metadata check before a commit
  POST /api/models/{repo}/preupload/{revision}      upload modes: weights ("*.safetensors", "*.bin", "*.pt",
                                                    "*.pth") go through LFS, as on the Hub; everything else inline
  POST /{repo}.git/info/lfs/objects/batch           LFS batch: one PUT URL per object
  PUT  /lfs-objects/{oid}                           the LFS object itself (basic transfer)
  POST /api/models/{repo}/commit/{revision}         the NDJSON commit: header, inline files, LFS pointers

Commits are applied to `hub.repos[repo_id][path] = bytes`; every request is kept in `hub.requests` as
(method, path, authorization header). Anything else answers 404 and is kept in `hub.unhandled`.
"""

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

USER = "horizon-tester"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: list[dict] = []
        self.requests: list[tuple[str, str, str | None]] = []
        self.unhandled: list[str] = []
        self._lfs: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

    # ------------------------------------------------------------------ endpoints
    def create_repo(self, body: dict):
        repo_id = f"{body.get('organization') or USER}/{body['name']}"
        with self._lock:
            self.repos.setdefault(repo_id, {})
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id}

    def preupload(self, repo_id: str, body: dict):
        if repo_id not in self.repos:
            return 404, {"error": f"Repository {repo_id} not found"}
        files = [
            {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
             "shouldIgnore": False, "oid": None}
            for f in body["files"]
        ]
        return 200, {"files": files}

    def lfs_batch(self, repo_id: str, body: dict):
        objects = [
            {"oid": o["oid"], "size": o["size"], "authenticated": True,
             "actions": {"upload": {"href": f"{self.url}/lfs-objects/{o['oid']}"}}}
            for o in body["objects"]
        ]
        return 200, {"transfer": "basic", "objects": objects}

    def lfs_put(self, oid: str, data: bytes):
        if hashlib.sha256(data).hexdigest() != oid:
            return 400, {"error": "sha256 mismatch"}
        with self._lock:
            self._lfs[oid] = data
        return 200, {}

    def commit(self, repo_id: str, revision: str, lines: list[dict]):
        if repo_id not in self.repos:
            return 404, {"error": f"Repository {repo_id} not found"}
        files, header = {}, None
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "header":
                header = value
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                if value["oid"] not in self._lfs:
                    return 422, {"error": f"LFS object {value['oid']} of {value['path']} was never uploaded"}
                files[value["path"]] = self._lfs[value["oid"]]
            else:
                return 422, {"error": f"unsupported commit operation {key}"}
        oid = hashlib.sha1(json.dumps(sorted(files)).encode() + str(len(self.commits)).encode()).hexdigest()
        with self._lock:
            self.repos[repo_id].update(files)
            self.commits.append({"repo_id": repo_id, "revision": revision, "header": header, "paths": sorted(files)})
        return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}

    def route(self, method: str, path: str, body: bytes):
        path = path.split("?", 1)[0]
        if method == "GET" and path == "/api/whoami-v2":
            return 200, {"type": "user", "name": USER, "auth": {"accessToken": {"role": "write"}}}
        if method == "POST" and path == "/api/repos/create":
            return self.create_repo(json.loads(body))
        if method == "POST" and path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}
        if method == "PUT" and (m := re.fullmatch(r"/lfs-objects/([0-9a-f]{64})", path)):
            return self.lfs_put(m[1], body)
        if method == "POST" and (m := re.fullmatch(r"/(.+)\.git/info/lfs/objects/batch", path)):
            return self.lfs_batch(m[1], json.loads(body))
        if method == "POST" and (m := re.fullmatch(r"/api/models/(.+)/preupload/([^/]+)", path)):
            return self.preupload(m[1], json.loads(body))
        if method == "POST" and (m := re.fullmatch(r"/api/models/(.+)/commit/([^/]+)", path)):
            return self.commit(m[1], m[2], [json.loads(line) for line in body.splitlines() if line.strip()])
        self.unhandled.append(f"{method} {path}")
        return 404, {"error": f"{method} {path} is not served by the fake Hub"}


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self):
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":  # streamed uploads (LFS PUT)
                body = self._read_chunked()
            else:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
            hub.requests.append((self.command, self.path, self.headers.get("Authorization")))
            status, payload = hub.route(self.command, self.path, body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status >= 400:
                self.send_header("X-Error-Message", payload.get("error", ""))
            self.end_headers()
            self.wfile.write(data)

        def _read_chunked(self) -> bytes:
            chunks = []
            while (size := int(self.rfile.readline().split(b";")[0].strip(), 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # the CRLF closing each chunk
            self.rfile.readline()  # the CRLF after the last (empty) chunk
            return b"".join(chunks)

        do_GET = do_POST = do_PUT = _serve

        def log_message(self, *args):  # keep pytest output clean
            pass

    return Handler
