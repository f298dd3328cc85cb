"""A stand-in for the Hugging Face hub on 127.0.0.1 (point HF_ENDPOINT at it).

Serves folders in the hub's layout for `huggingface_hub.snapshot_download`: the revision
API (`/api/{models,datasets}/ID/revision/REV`: commit sha and file list) and the files
(`/ID/resolve/REV/FILE`, `/datasets/ID/resolve/REV/FILE`, HEAD and GET, with the commit and
ETag headers the client reads). Counts every request by path, and can answer a status code
(`status`) or cut a file short after half its bytes (`cut_files`) to stand for the hub's
failures.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class Hub:
    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], Path] = {}  # (kind, repo id) -> folder
        self.requests: Counter[str] = Counter()
        self.status: int | None = None
        self.cut_files = 0  # the next N file GETs stop after half the bytes
        self.lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"hub": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, kind: str, repo_id: str, folder: Path) -> None:
        self.repos[(kind, repo_id)] = folder

    def file_gets(self) -> Counter[str]:
        return Counter(
            {p: n for p, n in self.requests.items() if p.startswith("GET ") and "/resolve/" in p}
        )

    def __enter__(self) -> Hub:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


def _digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    hub: Hub

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        path = unquote(self.path.split("?")[0])
        with self.hub.lock:
            self.hub.requests[f"{self.command} {path}"] += 1
        if self.hub.status is not None:  # with the error codes the hub sends
            self._error(
                self.hub.status, {401: "RepoNotFound", 403: "GatedRepo"}.get(self.hub.status, "")
            )
            return
        parts = path.strip("/").split("/")
        if parts[0] == "api":  # /api/{models,datasets}/ORG/NAME/{revision,tree}/REV
            verb = next((v for v in ("revision", "tree") if v in parts[3:]), None)
            if verb is None or parts[1] not in ("models", "datasets"):
                self._error(404)
                return
            kind = parts[1].rstrip("s")
            repo = "/".join(parts[2 : parts.index(verb)])
            folder = self.hub.repos.get((kind, repo))
            if folder is None:
                self._error(404, "RepoNotFound")
                return
            files = sorted(p for p in folder.rglob("*") if p.is_file())
            names = [str(p.relative_to(folder)) for p in files]
            info: Any = {"id": repo, "sha": COMMIT, "siblings": [{"rfilename": f} for f in names]}
            if verb == "tree":
                info = [
                    {"type": "file", "path": n, "size": p.stat().st_size, "oid": _digest(p)}
                    for n, p in zip(names, files, strict=True)
                ]
            self._send(json.dumps(info).encode(), "application/json", body)
            return
        kind = "dataset" if parts[0] == "datasets" else "model"
        if kind == "dataset":
            parts = parts[1:]
        at = parts.index("resolve")
        repo, filename = "/".join(parts[:at]), "/".join(parts[at + 2 :])
        folder = self.hub.repos.get((kind, repo))
        if folder is None or not (folder / filename).is_file():
            self._error(404, "EntryNotFound" if folder else "RepoNotFound")
            return
        data = (folder / filename).read_bytes()
        cut = False
        if body:
            with self.hub.lock:
                if self.hub.cut_files > 0:
                    self.hub.cut_files -= 1
                    cut = True
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.end_headers()
        if body:
            self.wfile.write(data[: len(data) // 2] if cut else data)
            if cut:
                self.wfile.flush()
                self.close_connection = True

    def _send(self, data: bytes, kind: str, body: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Repo-Commit", COMMIT)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _error(self, status: int, code: str = "") -> None:
        data = json.dumps({"error": code or f"status {status}"}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
