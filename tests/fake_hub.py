"""An in-process fake of the Hugging Face Hub HTTP API, plugged in at huggingface_hub's HTTP boundary.

huggingface_hub 2.x sends every request through one shared ``httpx2.Client`` built by a factory that
``huggingface_hub.set_client_factory`` replaces; the fake answers through ``httpx2.MockTransport``, so all of
``HfApi`` (whoami, create_repo, upload_folder with its preupload / validate-yaml / PR / commit calls) runs for real
and only the network is fake. Nothing here can reach the real Hub: an unknown route is recorded in
``unexpected`` and answered 404.

Files are always answered uploadMode "regular" by the preupload route, so huggingface_hub never starts a Xet
(or LFS) transfer: their contents arrive base64-encoded inside the ndjson commit body, where the fake decodes
them. A commit that tried Xet/LFS would show up as ``lfsFile`` entries (recorded in ``Commit.lfs_files``).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import threading
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote

import httpx2

HOST = "https://huggingface.co"


@dataclass
class Recorded:
    method: str
    path: str  # raw (still percent-encoded) path, without the query
    params: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: bytes


@dataclass
class Commit:
    repo_id: str
    revision: str  # unquoted, e.g. "main" or "refs/pr/1"
    params: dict[str, str]
    summary: str
    files: dict[str, bytes] = field(default_factory=dict)  # regular files, decoded
    lfs_files: list[dict] = field(default_factory=list)  # must stay empty: no Xet / LFS in this fake
    deleted: list[str] = field(default_factory=list)


class FakeHub:
    """Records what huggingface_hub sends; ``fail_commit`` = an HTTP status (e.g. 500) or "connect"."""

    def __init__(self, user: str = "alice", fail_commit: int | str | None = None):
        self.user = user
        self.fail_commit = fail_commit
        self.requests: list[Recorded] = []
        self.created: list[dict] = []  # JSON bodies of POST /api/repos/create
        self.repos: set[str] = set()
        self.preuploads: list[Recorded] = []
        self.validated_yaml: list[dict] = []
        self.pull_requests: list[dict] = []
        self.commits: list[Commit] = []
        self.commit_attempts = 0
        self.unexpected: list[Recorded] = []
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ plumbing

    def client(self) -> httpx2.Client:
        return httpx2.Client(transport=httpx2.MockTransport(self.handle), follow_redirects=True, timeout=None)

    @contextlib.contextmanager
    def installed(self):
        """Make huggingface_hub talk to this fake; restore its previous client factory afterwards."""
        import huggingface_hub
        from huggingface_hub.utils import _http
        previous = _http._GLOBAL_CLIENT_FACTORY
        huggingface_hub.set_client_factory(self.client)  # also closes the current shared client
        try:
            yield self
        finally:
            huggingface_hub.set_client_factory(previous)

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        raw = request.url.raw_path.decode("ascii")
        path, _, query = raw.partition("?")
        rec = Recorded(request.method, path, {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()},
                       {k.lower(): v for k, v in request.headers.items()}, request.read())
        with self._lock:
            self.requests.append(rec)
            return self._route(request, rec)

    # ------------------------------------------------------------------ routes

    def _route(self, request: httpx2.Request, rec: Recorded) -> httpx2.Response:
        seg = [unquote(s) for s in rec.path.strip("/").split("/")]
        m = rec.method
        if m == "GET" and seg == ["api", "whoami-v2"]:
            if not rec.headers.get("authorization", "").startswith("Bearer "):
                return _error(401, "Invalid credentials in Authorization header")
            return httpx2.Response(200, json={"type": "user", "id": "0" * 24, "name": self.user, "fullname": "Alice",
                                              "avatarUrl": f"{HOST}/avatars/{self.user}.svg",
                                              "email": None, "orgs": [], "isPro": False,
                                              "auth": {"type": "access_token",
                                                       "accessToken": {"displayName": "test", "role": "write"}}})
        if m == "POST" and seg == ["api", "repos", "create"]:
            body = json.loads(rec.body)
            self.created.append(body)
            repo_id = f"{body.get('organization') or self.user}/{body['name']}"
            if repo_id in self.repos:  # the real Hub also sends the url with its 409
                return httpx2.Response(409, json={"error": "You already created this model repo",
                                                  "url": f"{HOST}/{repo_id}"})
            self.repos.add(repo_id)
            return httpx2.Response(200, json={"url": f"{HOST}/{repo_id}", "name": repo_id, "id": "1" * 24})
        if m == "POST" and seg == ["api", "validate-yaml"]:
            self.validated_yaml.append(json.loads(rec.body))
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if len(seg) >= 5 and seg[0] == "api" and seg[1] in ("models", "datasets", "spaces"):
            repo_id, action, rest = f"{seg[2]}/{seg[3]}", seg[4], seg[5:]
            if m == "POST" and action == "preupload":
                self.preuploads.append(rec)
                files = json.loads(rec.body)["files"]
                return httpx2.Response(200, json={"files": [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]})
            if m == "POST" and action == "discussions" and not rest:
                body = json.loads(rec.body)
                num = len(self.pull_requests) + 1
                self.pull_requests.append({"repo_id": repo_id, "num": num, **body})
                return httpx2.Response(200, json={"num": num, "url": {"web": f"{HOST}/{repo_id}/discussions/{num}"}})
            if m == "GET" and action == "discussions" and len(rest) == 1:
                pr = next(p for p in self.pull_requests if p["repo_id"] == repo_id and p["num"] == int(rest[0]))
                return httpx2.Response(200, json={
                    "num": pr["num"], "title": pr["title"], "status": "draft", "isPullRequest": pr["pullRequest"],
                    "createdAt": "2026-01-01T00:00:00.000Z", "author": {"name": self.user},
                    "repo": {"name": repo_id, "type": "model"}, "events": [],
                    "changes": {"base": "refs/heads/main"}, "filesWithConflicts": [], "diff": ""})
            if m == "POST" and action == "commit" and len(rest) == 1:
                return self._commit(request, rec, repo_id, rest[0])
        if m == "HEAD" and "resolve" in seg:
            return httpx2.Response(404, headers={"X-Error-Code": "EntryNotFound"})
        self.unexpected.append(rec)
        return _error(404, f"fake hub: no route for {m} {rec.path}")

    def _commit(self, request: httpx2.Request, rec: Recorded, repo_id: str, revision: str) -> httpx2.Response:
        self.commit_attempts += 1
        if self.fail_commit == "connect":
            raise httpx2.ConnectError("[Errno 111] Connection refused", request=request)
        if self.fail_commit:
            return _error(int(self.fail_commit), "Internal Error - We're working hard to fix this as soon as possible!")
        lines = [json.loads(line) for line in rec.body.splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        commit = Commit(repo_id, revision, rec.params, header["summary"])
        for item in lines:
            value = item["value"]
            if item["key"] == "file":
                assert value["encoding"] == "base64"
                commit.files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                commit.lfs_files.append(value)
            elif item["key"] in ("deletedFile", "deletedFolder"):
                commit.deleted.append(value["path"])
        self.commits.append(commit)
        oid = hashlib.sha1(rec.body).hexdigest()
        pr = revision.startswith("refs/pr/")
        return httpx2.Response(200, json={
            "success": True, "commitOid": oid, "commitUrl": f"{HOST}/{repo_id}/commit/{oid}",
            "pullRequestUrl": f"{HOST}/{repo_id}/discussions/{revision.rsplit('/', 1)[-1]}" if pr else None})


def _error(status: int, message: str) -> httpx2.Response:
    return httpx2.Response(status, json={"error": message}, headers={"X-Error-Message": message})
