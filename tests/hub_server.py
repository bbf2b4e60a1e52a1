"""A small in-memory Hugging Face Hub on 127.0.0.1, enough for the real `huggingface_hub` client.

The tests push with `HfApi.create_repo` + `upload_folder` and read back with
`snapshot_download`, so this server speaks the HTTP routes those calls use
(checked against the installed client, with Xet disabled):

    POST /api/repos/create                          409 + JSON when the repo exists
    POST /api/validate-yaml                         README.md front matter check
    POST /api/models/{repo}/preupload/{rev}         regular vs LFS, remote oid per file
    POST /{repo}.git/info/lfs/objects/batch         LFS batch API, "basic" transfer
    PUT  /_lfs/{sha256}                             the upload target of the batch API
    POST /api/models/{repo}/commit/{rev}            NDJSON commit (also ?create_pr=1)
    POST /api/models/{repo}/branch/{branch}         create a branch
    GET  /api/models/{repo}[/revision/{rev}]        model_info / repo_info
    GET  /api/models/{repo}/tree/{rev}[/{path}]     tree listing (recursive)
    GET  /api/models/{repo}/refs                    branches and pull requests
    GET  /api/whoami-v2                             the token's user
    HEAD/GET /{repo}/resolve/{rev}/{path}           file download with X-Repo-Commit, ETag,
                                                    X-Linked-Etag, X-Linked-Size

Auth mirrors the Hub: a known token maps to a user; an unknown token gets 401
("Invalid credentials in Authorization header"); writing to another namespace
gets 403; private repos are invisible (401 RepoNotFound) without the owner's
token. Every commit is kept, so tests can count them, and `fail()` injects
server errors. Standard library only.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

VALID_TOKEN = "hf_valid_test_token_0123456789"
USER = "tester"
OTHER_TOKEN = "hf_other_user_token_0123456789"
OTHER_USER = "someone-else"
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"

# Paths stored with LFS, like the Hub's default .gitattributes; anything else larger
# than 10 MB or containing a NUL byte in its sample is LFS too.
LFS_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".gguf",
    ".h5",
    ".npz",
    ".png",
    ".jpg",
    ".pdf",
)
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob (what the Hub calls a regular file's oid)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
    )


@dataclass
class Blob:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def git_oid(self) -> str:
        # An LFS file's git blob is its pointer file.
        return git_blob_oid(lfs_pointer(self.sha256, len(self.data)) if self.lfs else self.data)

    @property
    def upload_oid(self) -> str:
        # What the client compares against to skip unchanged files: sha256 for LFS, git oid otherwise.
        return self.sha256 if self.lfs else self.git_oid


@dataclass
class Commit:
    oid: str
    parent: str | None
    files: dict[str, Blob]
    title: str


@dataclass
class Repo:
    repo_id: str
    owner: str
    private: bool
    commits: list[Commit] = field(default_factory=list)
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit oid
    pulls: list[str] = field(default_factory=list)  # refs/pr/N -> commit oid (index N-1)

    def commit(self, oid: str) -> Commit:
        return next(c for c in self.commits if c.oid == oid)


class HubState:
    """Repos, LFS objects, users, request log and injected faults; shared by handler threads."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.tokens = {VALID_TOKEN: USER, OTHER_TOKEN: OTHER_USER}
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.faults: list[list] = []  # [method, path regex, status, times left]
        self._serial = itertools.count()

    def new_commit(
        self, repo: Repo, parent: str | None, files: dict[str, Blob], title: str
    ) -> Commit:
        seed = json.dumps(
            [
                next(self._serial),
                repo.repo_id,
                parent,
                title,
                sorted((p, b.git_oid) for p, b in files.items()),
            ]
        )
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, files, title)
        repo.commits.append(commit)
        return commit

    def create_repo(self, repo_id: str, owner: str, private: bool = False) -> Repo:
        repo = Repo(repo_id, owner, private)
        initial = self.new_commit(
            repo, None, {".gitattributes": Blob(GITATTRIBUTES, lfs=False)}, "initial commit"
        )
        repo.branches["main"] = initial.oid
        self.repos[repo_id] = repo
        return repo

    def resolve(self, repo: Repo, rev: str) -> str | None:
        if rev in repo.branches:
            return repo.branches[rev]
        if m := re.fullmatch(r"refs/pr/(\d+)", rev):
            n = int(m.group(1))
            return repo.pulls[n - 1] if 0 < n <= len(repo.pulls) else None
        if any(c.oid == rev for c in repo.commits):
            return rev
        return None


class HubServer:
    """Run a HubState behind a threaded HTTP server on 127.0.0.1 with a random port."""

    def __init__(self) -> None:
        self.state = HubState()
        handler = type("BoundHandler", (HubHandler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="hub-server", daemon=True
        )

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)

    # Helpers for tests.
    def commits(self, repo_id: str) -> list[Commit]:
        with self.state.lock:
            return list(self.state.repos[repo_id].commits)

    def head(self, repo_id: str, branch: str = "main") -> str:
        with self.state.lock:
            return self.state.repos[repo_id].branches[branch]

    def files(self, repo_id: str, rev: str = "main") -> dict[str, Blob]:
        with self.state.lock:
            repo = self.state.repos[repo_id]
            return dict(repo.commit(self.state.resolve(repo, rev)).files)

    def add_repo(self, repo_id: str, owner: str, private: bool = False) -> None:
        with self.state.lock:
            self.state.create_repo(repo_id, owner, private)

    def fail(self, method: str, path_pattern: str, status: int = 500, times: int = 1) -> None:
        """Answer the next `times` requests matching METHOD and a path regex with `status`."""
        with self.state.lock:
            self.state.faults.append([method, re.compile(path_pattern), status, times])

    @property
    def requests(self) -> list[tuple[str, str]]:
        with self.state.lock:
            return list(self.state.requests)


class HubError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict | None = None,
        **extra,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.extra = (
            status,
            message,
            code,
            headers or {},
            extra,
        )


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: HubState  # set on the bound subclass

    def log_message(self, format, *args):  # noqa: A002 - keep test output quiet
        pass

    # -- plumbing -----------------------------------------------------------------
    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: dict | None = None,
        content_type="application/json",
    ):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict | None = None):
        self._send(status, json.dumps(payload).encode(), headers)

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.body = self._read_body()
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        with self.state.lock:
            self.state.requests.append((method, url.path))
            fault = next(
                (
                    f
                    for f in self.state.faults
                    if f[0] == method and f[1].search(url.path) and f[3] > 0
                ),
                None,
            )
            if fault:
                fault[3] -= 1
        try:
            if fault:
                raise HubError(
                    fault[2], "Internal Error - We're working hard to fix this as soon as possible!"
                )
            self._route(method, parts)
        except HubError as err:
            headers = {"X-Error-Message": err.message, **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._json(err.status, {"error": err.message, **err.extra}, headers)

    def _route(self, method: str, parts: list[str]) -> None:
        if parts[:1] == ["api"]:
            rest = parts[1:]
            if method == "POST" and rest == ["repos", "create"]:
                return self.create_repo()
            if method == "POST" and rest == ["validate-yaml"]:
                return self.validate_yaml()
            if method == "GET" and rest == ["whoami-v2"]:
                return self._json(200, {"type": "user", "name": self._require_user()})
            if len(rest) >= 3 and rest[0] == "models":
                repo_id, sub = f"{rest[1]}/{rest[2]}", rest[3:]
                if method == "GET" and not sub:
                    return self.repo_info(repo_id, "main")
                if method == "GET" and sub[0] == "revision" and len(sub) == 2:
                    return self.repo_info(repo_id, sub[1])
                if method == "GET" and sub[0] == "tree" and len(sub) >= 2:
                    return self.tree(repo_id, sub[1], "/".join(sub[2:]))
                if method == "GET" and sub == ["refs"]:
                    return self.refs(repo_id)
                if method == "POST" and sub[0] == "preupload" and len(sub) == 2:
                    return self.preupload(repo_id, sub[1])
                if method == "POST" and sub[0] == "commit" and len(sub) == 2:
                    return self.commit(repo_id, sub[1])
                if method == "POST" and sub[0] == "branch" and len(sub) == 2:
                    return self.create_branch(repo_id, sub[1])
        if method == "PUT" and len(parts) == 2 and parts[0] == "_lfs":
            return self.lfs_put(parts[1])
        if (
            method == "POST"
            and len(parts) == 6
            and parts[1].endswith(".git")
            and parts[2:] == ["info", "lfs", "objects", "batch"]
        ):
            return self.lfs_batch(f"{parts[0]}/{parts[1][:-4]}")
        if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
            return self.resolve_file(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        raise HubError(
            404, f"Sorry, we can't find the page you are looking for ({method} {self.path})"
        )

    # -- auth ---------------------------------------------------------------------
    def _user(self) -> str | None:
        auth = self.headers.get("Authorization")
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        user = self.state.tokens.get(token)
        if user is None:
            raise HubError(401, INVALID_CREDENTIALS)
        return user

    def _require_user(self) -> str:
        user = self._user()
        if user is None:
            raise HubError(401, "You must be authenticated to access this resource")
        return user

    def _repo_for_read(self, repo_id: str) -> Repo:
        user = self._user()
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and user != repo.owner):
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def _repo_for_write(self, repo_id: str) -> Repo:
        user = self._require_user()
        repo = self._repo_for_read(repo_id)
        if user != repo.owner:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _revision(self, repo: Repo, rev: str) -> str:
        oid = self.state.resolve(repo, rev)
        if oid is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return oid

    # -- endpoints ----------------------------------------------------------------
    def create_repo(self):
        user = self._require_user()
        payload = json.loads(self.body or b"{}")
        namespace = payload.get("organization") or user
        repo_id = f"{namespace}/{payload['name']}"
        if payload.get("type", "model") != "model":
            raise HubError(400, "this test server only hosts model repos")
        if namespace != user:
            raise HubError(
                403,
                f'You don\'t have the rights to create a model under the namespace "{namespace}"',
            )
        with self.state.lock:
            if repo_id in self.state.repos:
                raise HubError(
                    409, "You already created this model repo", url=f"{self._base()}/{repo_id}"
                )
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            self.state.create_repo(repo_id, user, private)
        self._json(200, {"url": f"{self._base()}/{repo_id}", "name": repo_id, "id": repo_id})

    def validate_yaml(self):
        content = json.loads(self.body or b"{}").get("content", "")
        m = re.match(r"^\s*---[\r\n]+([\S\s]*?)[\r\n]+---(\r\n|\n|$)", content)
        errors = []
        if m:
            try:
                data = yaml.safe_load(m.group(1))
                if data is not None and not isinstance(data, dict):
                    errors.append({"message": "metadata must be a YAML mapping"})
            except yaml.YAMLError as exc:
                errors.append({"message": f"Invalid YAML: {exc}"})
        elif content.lstrip().startswith("---"):
            errors.append({"message": "metadata block is not closed with ---"})
        self._json(400 if errors else 200, {"errors": errors, "warnings": []})

    def repo_info(self, repo_id: str, rev: str):
        with self.state.lock:
            repo = self._repo_for_read(repo_id)
            oid = self._revision(repo, rev)
            files = repo.commit(oid).files
            self._json(
                200,
                {
                    "id": repo_id,
                    "modelId": repo_id,
                    "author": repo.owner,
                    "sha": oid,
                    "private": repo.private,
                    "lastModified": "2026-01-01T00:00:00.000Z",
                    "tags": [],
                    "downloads": 0,
                    "likes": 0,
                    "siblings": [{"rfilename": path} for path in sorted(files)],
                },
            )

    def tree(self, repo_id: str, rev: str, prefix: str):
        recursive = self.query.get("recursive", "false").lower() in ("1", "true")
        with self.state.lock:
            repo = self._repo_for_read(repo_id)
            files = repo.commit(self._revision(repo, rev)).files
        base = f"{prefix.rstrip('/')}/" if prefix else ""
        entries, folders = [], set()
        for path in sorted(files):
            if not path.startswith(base):
                continue
            rel = path[len(base) :].split("/")
            for depth in range(1, len(rel)):
                folders.add(base + "/".join(rel[:depth]))
            if recursive or len(rel) == 1:
                blob = files[path]
                entry = {"type": "file", "path": path, "size": len(blob.data), "oid": blob.git_oid}
                if blob.lfs:
                    pointer = lfs_pointer(blob.sha256, len(blob.data))
                    entry["lfs"] = {
                        "oid": blob.sha256,
                        "size": len(blob.data),
                        "pointerSize": len(pointer),
                    }
                entries.append(entry)
        for folder in sorted(folders):
            if recursive or "/" not in folder[len(base) :]:
                entries.append(
                    {
                        "type": "directory",
                        "path": folder,
                        "oid": hashlib.sha1(folder.encode()).hexdigest(),
                    }
                )
        if prefix and not entries:
            raise HubError(404, f"Entry not found: {prefix}", "EntryNotFound")
        self._json(200, entries)

    def refs(self, repo_id: str):
        with self.state.lock:
            repo = self._repo_for_read(repo_id)
            branches = [
                {"name": n, "ref": f"refs/heads/{n}", "targetCommit": o}
                for n, o in repo.branches.items()
            ]
            pulls = [
                {"name": f"refs/pr/{i + 1}", "ref": f"refs/pr/{i + 1}", "targetCommit": o}
                for i, o in enumerate(repo.pulls)
            ]
        self._json(200, {"branches": branches, "converts": [], "tags": [], "pullRequests": pulls})

    def create_branch(self, repo_id: str, branch: str):
        with self.state.lock:
            repo = self._repo_for_write(repo_id)
            if branch in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            start = json.loads(self.body or b"{}").get("startingPoint") or "main"
            repo.branches[branch] = self._revision(repo, start)
        self._json(200, {})

    def preupload(self, repo_id: str, rev: str):
        payload = json.loads(self.body)
        with self.state.lock:
            repo = self._repo_for_write(repo_id)
            rev = "main" if self.query.get("create_pr") else rev
            files = repo.commit(self._revision(repo, rev)).files
        answer = []
        for item in payload["files"]:
            sample = base64.b64decode(item["sample"])
            lfs = (
                item["path"].endswith(LFS_SUFFIXES) or item["size"] >= 10_000_000 or b"\0" in sample
            )
            remote = files.get(item["path"])
            answer.append(
                {
                    "path": item["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": remote.upload_oid if remote is not None and remote.lfs == lfs else None,
                }
            )
        self._json(200, {"files": answer, "commitOid": None})

    def lfs_batch(self, repo_id: str):
        payload = json.loads(self.body)
        with self.state.lock:
            self._repo_for_write(repo_id)
            objects = []
            for obj in payload["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                if obj["oid"] not in self.state.lfs:
                    entry["actions"] = {"upload": {"href": f"{self._base()}/_lfs/{obj['oid']}"}}
                objects.append(entry)
        body = json.dumps({"transfer": "basic", "objects": objects}).encode()
        self._send(200, body, content_type="application/vnd.git-lfs+json")

    def lfs_put(self, oid: str):
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(400, f"uploaded content does not match sha256 {oid}")
        with self.state.lock:
            self.state.lfs[oid] = self.body
        self._send(200, b"", {"ETag": f'"{oid}"'})

    def commit(self, repo_id: str, rev: str):
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        create_pr = bool(self.query.get("create_pr"))
        with self.state.lock:
            repo = self._repo_for_write(repo_id)
            parent = self._revision(repo, "main" if create_pr else rev)
            if header.get("parentCommit") and not parent.startswith(header["parentCommit"]):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            if not create_pr and rev not in repo.branches:
                raise HubError(400, f"Cannot commit to {rev}: not a branch")
            files = dict(repo.commit(parent).files)
            for item in lines:
                key, value = item["key"], item["value"]
                if key == "file":
                    files[value["path"]] = Blob(base64.b64decode(value["content"]), lfs=False)
                elif key == "lfsFile":
                    if value["oid"] not in self.state.lfs:
                        raise HubError(
                            422, f"LFS object {value['oid']} for {value['path']} was never uploaded"
                        )
                    files[value["path"]] = Blob(self.state.lfs[value["oid"]], lfs=True)
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key == "deletedFolder":
                    folder = value["path"].rstrip("/") + "/"
                    files = {p: b for p, b in files.items() if not p.startswith(folder)}
            commit = self.state.new_commit(repo, parent, files, header.get("summary", ""))
            pr_url = None
            if create_pr:
                repo.pulls.append(commit.oid)
                pr_url = f"{self._base()}/{repo_id}/discussions/{len(repo.pulls)}"
            else:
                repo.branches[rev] = commit.oid
        self._json(
            200,
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self._base()}/{repo_id}/commit/{commit.oid}",
                "commitMessage": commit.title,
                "hookOutput": "",
                "pullRequestUrl": pr_url,
            },
        )

    def resolve_file(self, repo_id: str, rev: str, path: str):
        with self.state.lock:
            repo = self._repo_for_read(repo_id)
            oid = self._revision(repo, rev)
            blob = repo.commit(oid).files.get(path)
        if blob is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": oid})
        data, headers = blob.data, {"X-Repo-Commit": oid, "Accept-Ranges": "bytes"}
        if blob.lfs:
            headers.update(
                {
                    "ETag": f'"{blob.sha256}"',
                    "X-Linked-Etag": f'"{blob.sha256}"',
                    "X-Linked-Size": str(len(data)),
                }
            )
        else:
            headers["ETag"] = f'"{blob.git_oid}"'
        status = 200
        if m := re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "")):
            start, end = int(m.group(1)), int(m.group(2) or len(data) - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start : end + 1], 206
        self._send(status, data, headers, "application/octet-stream")

    def _base(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"
