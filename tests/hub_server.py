"""A local, in-memory server speaking the part of the Hugging Face Hub HTTP API that `huggingface_hub` uses to
create a repo, upload files (regular and LFS, basic transfer) and download them again.

Standard library only. Start it with `HubServer(users={token: (name, [orgs])})`; point clients at it with
`HF_ENDPOINT=server.url` and `HF_HUB_DISABLE_XET=1` (there is no Xet storage here). Every request is recorded in
`server.requests` (method, path, headers) so tests can check what a client sent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit


@dataclass
class _Repo:
    owner: str
    private: bool
    # branch -> commit sha; commit sha -> {path: (blob sha256, is_lfs)}
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, tuple[str, bool]]] = field(default_factory=dict)


class HubServer:
    """In-memory Hub: `users` maps a token to `(user name, [organisation names])`."""

    def __init__(self, users: dict[str, tuple[str, list[str]]]):
        self.users = users
        self.repos: dict[str, _Repo] = {}
        self.blobs: dict[str, bytes] = {}  # sha256 hex -> content
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # --- state helpers -----------------------------------------------------------------------------------------
    def new_repo(self, repo_id: str, owner: str, private: bool) -> _Repo:
        repo = _Repo(owner=owner, private=private)
        empty = hashlib.sha1(f"init:{repo_id}".encode()).hexdigest()
        repo.commits[empty] = {}
        repo.branches["main"] = empty
        self.repos[repo_id] = repo
        return repo

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        sha = repo.branches.get(revision, revision)
        return {p: self.blobs[h] for p, (h, _) in repo.commits[sha].items()}


def _make_handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet
            pass

        # --- plumbing ----------------------------------------------------------------------------------------
        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _send(self, status: int, payload: Any = None, headers: dict[str, str] | None = None,
                  raw: bytes | None = None, head: bool = False) -> None:
            data = raw if raw is not None else (b"" if payload is None else json.dumps(payload).encode())
            self.send_response(status)
            if raw is None:
                self.send_header("Content-Type", "application/json")
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if not head:
                self.wfile.write(data)

        def _error(self, status: int, message: str, code: str | None = None, head: bool = False) -> None:
            headers = {"X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, {"error": message}, headers, head=head)

        def _user(self) -> tuple[str, list[str]] | None:
            auth = self.headers.get("Authorization", "")
            return hub.users.get(auth[7:]) if auth.startswith("Bearer ") else None

        def _has_bad_token(self) -> bool:
            return self.headers.get("Authorization", "").startswith("Bearer ") and self._user() is None

        def _can_write(self, namespace: str) -> bool:
            user = self._user()
            return user is not None and (namespace == user[0] or namespace in user[1])

        def _readable(self, repo_id: str, head: bool = False) -> _Repo | None:
            """The repo if this request may read it; otherwise answers like the Hub (private = not found)."""
            repo = hub.repos.get(repo_id)
            if self._has_bad_token():
                self._error(401, "Invalid credentials in Authorization header", head=head)
                return None
            if repo is None or (repo.private and not self._can_write(repo.owner)):
                self._error(401 if self._user() is None else 404, "Repository not found", "RepoNotFound", head=head)
                return None
            return repo

        def _writable(self, repo_id: str) -> _Repo | None:
            if self._user() is None:
                self._error(401, "Invalid credentials in Authorization header")
                return None
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "Repository not found", "RepoNotFound")
                return None
            if not self._can_write(repo.owner):
                self._error(403, f"You don't have the rights to write to {repo_id}")
                return None
            return repo

        def _record(self) -> None:
            with hub.lock:
                hub.requests.append((self.command, self.path, dict(self.headers.items())))

        # --- routes ------------------------------------------------------------------------------------------
        def do_GET(self) -> None:
            self._record()
            self._route_get(head=False)

        def do_HEAD(self) -> None:
            self._record()
            self._route_get(head=True)

        def _route_get(self, head: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            if path == "/api/whoami-v2":
                user = self._user()
                if user is None:
                    return self._error(401, "Invalid credentials in Authorization header", head=head)
                return self._send(200, {"type": "user", "name": user[0], "orgs": [{"name": o} for o in user[1]],
                                        "auth": {"type": "access_token", "accessToken": {"role": "write"}}},
                                  head=head)
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path)
            if m:
                repo = self._readable(m.group(1), head)
                if repo is None:
                    return None
                rev = m.group(2) or "main"
                sha = repo.branches.get(rev, rev if rev in repo.commits else None)
                if sha is None:
                    return self._error(404, "Invalid rev id", "RevisionNotFound", head=head)
                return self._send(200, {"id": m.group(1), "modelId": m.group(1), "sha": sha, "private": repo.private,
                                        "siblings": [{"rfilename": p} for p in sorted(repo.commits[sha])]},
                                  head=head)
            m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if m:
                return self._resolve(m.group(1), m.group(2), m.group(3), head)
            return self._error(404, f"no route {path}", head=head)

        def _resolve(self, repo_id: str, rev: str, filename: str, head: bool) -> None:
            repo = self._readable(repo_id, head)
            if repo is None:
                return None
            sha = repo.branches.get(rev, rev if rev in repo.commits else None)
            if sha is None:
                return self._error(404, "Invalid rev id", "RevisionNotFound", head=head)
            entry = repo.commits[sha].get(filename)
            if entry is None:
                return self._error(404, "Entry not found", "EntryNotFound", head=head)
            blob_sha, is_lfs = entry
            data = hub.blobs[blob_sha]
            headers = {"X-Repo-Commit": sha, "ETag": f'"{blob_sha}"', "Content-Type": "application/octet-stream"}
            if is_lfs:
                headers.update({"X-Linked-Etag": f'"{blob_sha}"', "X-Linked-Size": str(len(data))})
            return self._send(200, headers=headers, raw=data, head=head)

        def do_PUT(self) -> None:
            self._record()
            path = urlsplit(self.path).path
            m = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path)
            if not m:
                return self._error(404, f"no route {path}")
            data = self._body()
            if hashlib.sha256(data).hexdigest() != m.group(1):
                return self._error(400, "content does not match its sha256")
            with hub.lock:
                hub.blobs[m.group(1)] = data
            return self._send(200, {})

        def do_POST(self) -> None:
            self._record()
            path = unquote(urlsplit(self.path).path)
            body = self._body()
            if path == "/api/validate-yaml":
                return self._send(200, {"errors": [], "warnings": []})
            if path == "/api/repos/create":
                return self._create_repo(json.loads(body))
            if path == "/lfs-verify":
                oid = json.loads(body)["oid"]
                return self._send(200, {}) if oid in hub.blobs else self._error(404, "object not uploaded")
            m = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
            if m:
                return self._lfs_batch(m.group(1), json.loads(body))
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/(.+)", path)
            if m:
                return self._preupload(m.group(1), json.loads(body))
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/(.+)", path)
            if m:
                return self._commit(m.group(1), m.group(2), body)
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/branch/(.+)", path)
            if m:
                repo = self._writable(m.group(1))
                if repo is None:
                    return None
                if m.group(2) in repo.branches:
                    return self._error(409, "Reference already exists")
                repo.branches[m.group(2)] = repo.branches["main"]
                return self._send(200, {})
            return self._error(404, f"no route {path}")

        def _create_repo(self, payload: dict[str, Any]) -> None:
            user = self._user()
            if user is None:
                return self._error(401, "Invalid credentials in Authorization header")
            namespace = payload.get("organization") or user[0]
            repo_id = f"{namespace}/{payload['name']}"
            if not self._can_write(namespace):
                return self._error(403, f"You don't have the rights to create a model under the namespace "
                                        f'"{namespace}"')
            with hub.lock:
                if repo_id in hub.repos:  # the Hub's 409 also carries the url, which exist_ok relies on
                    return self._send(409, {"error": "You already created this model repo",
                                            "url": f"{hub.url}/{repo_id}"},
                                      {"X-Error-Message": "You already created this model repo"})
                private = payload.get("visibility") == "private" or bool(payload.get("private"))
                hub.new_repo(repo_id, namespace, private)
            return self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})

        def _preupload(self, repo_id: str, payload: dict[str, Any]) -> None:
            if self._writable(repo_id) is None:
                return None
            files = []
            for f in payload["files"]:
                sample = base64.b64decode(f.get("sample", ""))
                try:
                    sample.decode("utf-8")
                    binary = b"\x00" in sample
                except UnicodeDecodeError:
                    binary = True
                lfs = binary or f["size"] > 10_000_000 or f["path"].endswith(".safetensors")
                files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False})
            return self._send(200, {"files": files, "commitOid": None})

        def _lfs_batch(self, repo_id: str, payload: dict[str, Any]) -> None:
            if self._writable(repo_id) is None:
                return None
            objects = []
            for obj in payload["objects"]:
                entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in hub.blobs:  # no actions: the server already has it
                    entry["actions"] = {"upload": {"href": f"{hub.url}/lfs-upload/{obj['oid']}"},
                                        "verify": {"href": f"{hub.url}/lfs-verify"}}
                objects.append(entry)
            return self._send(200, {"transfer": "basic", "objects": objects})

        def _commit(self, repo_id: str, rev: str, body: bytes) -> None:
            repo = self._writable(repo_id)
            if repo is None:
                return None
            if rev not in repo.branches:
                return self._error(404, "Invalid rev id", "RevisionNotFound")
            tree = dict(repo.commits[repo.branches[rev]])
            lines = [json.loads(x) for x in body.splitlines() if x.strip()]
            summary = ""
            for item in lines:
                key, value = item["key"], item["value"]
                if key == "header":
                    summary = value.get("summary", "")
                elif key == "file":
                    data = base64.b64decode(value["content"]) if value.get("encoding") == "base64" else \
                        value["content"].encode()
                    sha = hashlib.sha256(data).hexdigest()
                    with hub.lock:
                        hub.blobs[sha] = data
                    tree[value["path"]] = (sha, False)
                elif key == "lfsFile":
                    if value["oid"] not in hub.blobs:
                        return self._error(400, f"LFS object {value['oid']} was not uploaded")
                    tree[value["path"]] = (value["oid"], True)
                elif key in ("deletedFile", "deletedFolder"):
                    tree = {p: v for p, v in tree.items() if not (p == value["path"] or
                                                                 p.startswith(value["path"].rstrip("/") + "/"))}
            sha = hashlib.sha1(json.dumps([repo.branches[rev], summary, sorted(tree.items())]).encode()).hexdigest()
            with hub.lock:
                repo.commits[sha] = tree
                repo.branches[rev] = sha
            return self._send(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha,
                                    "pullRequestUrl": None})

    return Handler
