"""A Hugging Face Hub on loopback, for tests: the two endpoints huggingface_hub downloads through.

    GET  /api/models/{org}/{name}/revision/{rev}   model info JSON: sha + siblings (size, blobId, lfs)
    HEAD /{org}/{name}/resolve/{rev}/{file}        ETag, X-Repo-Commit, Content-Length, Accept-Ranges
    GET  /{org}/{name}/resolve/{rev}/{file}        the bytes; Range -> 206 with Content-Range

with the Hub's error answers: 404 + X-Error-Code RepoNotFound / RevisionNotFound / EntryNotFound,
401 + X-Error-Code GatedRepo without the right bearer token. Small files are plain git blobs, served
directly (ETag = git blob id). Large files are "LFS", and as on the Hub their /resolve/ answers a 302
to a CDN on another origin (a second loopback port) carrying X-Linked-Etag (the SHA-256) and
X-Linked-Size; the CDN serves the bytes (with Range), and sees no Authorization header. `cut_once` makes the first GET of a
file stop halfway and close the connection, to test resuming; `corrupt` serves a file with one byte
changed. Every request is recorded.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import unquote, urlsplit

LFS_THRESHOLD = 1024  # bytes; the Hub's rule is by .gitattributes, any fixed rule does here


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str
    token: Optional[str] = None  # gated: only this bearer token gets in
    branches: dict[str, str] = field(default_factory=dict)


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, dict]] = []
        self.cut_once: set[str] = set()  # file names whose first GET is cut halfway
        self.corrupt: set[str] = set()  # file names served with one byte changed (hashes in the listing kept)
        self.served: list[tuple[str, dict]] = []  # (file name, request headers) of every GET that sent bytes
        self._server: Optional[ThreadingHTTPServer] = None
        self._cdn: Optional[ThreadingHTTPServer] = None

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, token: Optional[str] = None) -> str:
        commit = hashlib.sha1(repo_id.encode() + "".join(sorted(files)).encode()).hexdigest()
        self.repos[repo_id] = Repo(dict(files), commit, token, {"main": commit})
        return commit

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def cdn_url(self) -> str:
        assert self._cdn is not None
        host, port = self._cdn.server_address[:2]
        return f"http://{host}:{port}"

    def gets(self, name: str) -> list[dict]:
        """Request headers of each GET that sent (some of) the bytes of file `name`."""
        return [headers for served, headers in self.served if served == name]

    def start(self) -> "FakeHub":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                hub._serve(self, body=False)

            def do_GET(self) -> None:
                hub._serve(self, body=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._cdn = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        for server in (self._server, self._cdn):
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        for server in (self._server, self._cdn):
            if server is not None:
                server.shutdown()
                server.server_close()
        self._server = self._cdn = None

    # -- answering ---------------------------------------------------------------------------------

    def _send(self, h: BaseHTTPRequestHandler, status: int, headers: dict, body: bytes = b"",
              send_body: bool = True) -> None:
        headers = dict(headers)
        length = headers.pop("Content-Length", len(body))
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, str(v))
        h.send_header("Content-Length", str(length))
        h.end_headers()
        if send_body and body:
            h.wfile.write(body)

    def _error(self, h, status: int, code: str, body: bool, extra: Optional[dict] = None) -> None:
        msg = json.dumps({"error": code}).encode()
        headers = {"X-Error-Code": code, "X-Error-Message": code, "Content-Type": "application/json", **(extra or {})}
        self._send(h, status, headers, msg, body)

    def _repo(self, h, repo_id: str, body: bool) -> Optional[Repo]:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(h, 404, "RepoNotFound", body)
            return None
        if repo.token is not None and h.headers.get("authorization") != f"Bearer {repo.token}":
            self._error(h, 401, "GatedRepo", body)
            return None
        return repo

    def _commit(self, repo: Repo, rev: str) -> Optional[str]:
        return rev if rev == repo.commit else repo.branches.get(rev)

    def _serve(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = urlsplit(h.path).path
        self.requests.append((h.command, path, {k.lower(): v for k, v in h.headers.items()}))
        parts = path.strip("/").split("/")
        if h.server is self._cdn:
            blob = self._lfs_blob(parts[-1]) if parts[0] == "lfs" else None
            if blob is None:
                return self._send(h, 404, {}, b"no such blob", body)
            return self._file(h, *blob, body)
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "revision":
            repo_id, rev = f"{parts[2]}/{parts[3]}", unquote("/".join(parts[5:]))
            repo = self._repo(h, repo_id, body)
            if repo is None:
                return
            commit = self._commit(repo, rev)
            if commit is None:
                return self._error(h, 404, "RevisionNotFound", body)
            info = {"_id": commit, "id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                    "gated": repo.token is not None and "manual", "disabled": False, "tags": [],
                    "siblings": [self._sibling(name, data) for name, data in sorted(repo.files.items())]}
            return self._send(h, 200, {"Content-Type": "application/json"}, json.dumps(info).encode(), body)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id, rev, name = f"{parts[0]}/{parts[1]}", unquote(parts[3]), unquote("/".join(parts[4:]))
            repo = self._repo(h, repo_id, body)
            if repo is None:
                return
            commit = self._commit(repo, rev)
            if commit is None:
                return self._error(h, 404, "RevisionNotFound", body)
            data = repo.files.get(name)
            if data is None:
                return self._error(h, 404, "EntryNotFound", body, {"X-Repo-Commit": commit})
            if len(data) > LFS_THRESHOLD:
                sha = hashlib.sha256(data).hexdigest()
                pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n"
                return self._send(h, 302, {"Location": f"{self.cdn_url}/lfs/{sha}?signature=loopback",
                                           "X-Repo-Commit": commit, "X-Linked-Etag": f'"{sha}"',
                                           "X-Linked-Size": len(data), "ETag": f'"{_git_sha1(pointer.encode())}"'},
                                  b"", body)
            return self._file(h, data, name, commit, body)
        self._error(h, 404, "RepoNotFound", body)

    def _lfs_blob(self, sha: str) -> Optional[tuple[bytes, str, str]]:
        for repo in self.repos.values():
            for name, data in repo.files.items():
                if len(data) > LFS_THRESHOLD and hashlib.sha256(data).hexdigest() == sha:
                    return data, name, repo.commit
        return None

    def _sibling(self, name: str, data: bytes) -> dict:
        sib = {"rfilename": name, "size": len(data), "blobId": _git_sha1(data)}
        if len(data) > LFS_THRESHOLD:
            sib["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
        return sib

    def _file(self, h, data: bytes, name: str, commit: str, body: bool) -> None:
        etag = hashlib.sha256(data).hexdigest() if len(data) > LFS_THRESHOLD else _git_sha1(data)
        headers = {"ETag": f'"{etag}"', "X-Repo-Commit": commit, "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream",
                   "Content-Disposition": f'inline; filename="{name.rsplit("/", 1)[-1]}";'}
        if name in self.corrupt:
            data = bytes([data[0] ^ 1]) + data[1:]
        start, status = 0, 200
        rng = h.headers.get("Range")
        if rng and rng.startswith("bytes="):
            first, _, last = rng[len("bytes="):].partition("-")
            start = int(first)
            end = int(last) if last else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start:end + 1], 206
        if not body:
            return self._send(h, status, {**headers, "Content-Length": len(data)}, b"", False)
        self.served.append((name, {k.lower(): v for k, v in h.headers.items()}))
        if name in self.cut_once and start == 0:
            self.cut_once.discard(name)
            h.send_response(status)
            for k, v in {**headers, "Content-Length": len(data)}.items():
                h.send_header(k, str(v))
            h.end_headers()
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        self._send(h, status, headers, data, True)
