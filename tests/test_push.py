"""push_folder against a loopback fake of the Hub endpoints huggingface_hub calls (nothing leaves 127.0.0.1).

Endpoints, as huggingface_hub 2.4 calls them for create_repo / create_branch / upload_folder:
  POST /api/repos/create                              {"name", "organization", "visibility", "type"}
  POST /api/models/{repo}/branch/{branch}
  POST /api/validate-yaml                             README.md front matter check
  POST /api/models/{repo}/preupload/{rev}             -> every file "regular" (inline base64, no LFS/xet)
  POST /api/models/{repo}/discussions                 create_pr on the xet pipeline path: opens the PR first
  GET  /api/models/{repo}/discussions/{num}
  POST /api/models/{repo}/commit/{rev}                NDJSON: a header line, then one "file" line per file
"""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from huggingface_hub import constants as hub_constants
from huggingface_hub.utils import _http as hub_http

from ma_convert.push import push_folder

pytestmark = pytest.mark.timeout(60)  # a hung request must fail the test, not the whole run

TOKEN = "hf_dummy_token_for_tests"
REPO = "tester/tiny-ma"
PR_NUM = 7


class FakeHub:
    """Records every request; `fail` maps a step ("create", "branch", "preupload", "commit") to
    (status, message) to answer with instead."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.commits: list[dict] = []
        self.fail: dict[str, tuple[int, str]] = {}
        self.lock = threading.Lock()
        self.base = ""

    def route(self, method: str, path: str, query: dict, body: bytes) -> tuple[str, int, dict]:
        if method == "POST" and path == "/api/repos/create":
            payload = json.loads(body)
            name = "/".join(filter(None, [payload.get("organization"), payload["name"]]))
            return "create", 200, {"url": f"{self.base}/{name}", "name": name}
        if method == "POST" and path == "/api/validate-yaml":
            return "validate", 200, {"errors": [], "warnings": []}
        if m := re.fullmatch(r"/api/models/(.+)/branch/([^/]+)", path):
            return "branch", 200, {}
        if m := re.fullmatch(r"/api/models/(.+)/preupload/([^/]+)", path):
            files = json.loads(body)["files"]
            # Everything small goes inline: "regular" for every file, nothing to send to LFS/xet storage.
            answer = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]
            return "preupload", 200, {"files": answer, "commitOid": "0" * 40}
        if method == "POST" and (m := re.fullmatch(r"/api/models/(.+)/discussions", path)):
            return "discussion", 200, {"num": PR_NUM, "url": f"{self.base}/{m[1]}/discussions/{PR_NUM}"}
        if method == "GET" and (m := re.fullmatch(r"/api/models/(.+)/discussions/(\d+)", path)):
            return "discussion", 200, self._discussion(m[1], int(m[2]))
        if m := re.fullmatch(r"/api/models/(.+)/commit/([^/]+)", path):
            self.commits.append(self._decode_commit(m[1], unquote(m[2]), query, body))
            oid = f"{len(self.commits):040x}"
            pr_url = f"{self.base}/{m[1]}/discussions/{PR_NUM}" if query.get("create_pr") == ["1"] else None
            return (
                "commit",
                200,
                {
                    "commitUrl": f"{self.base}/{m[1]}/commit/{oid}",
                    "commitOid": oid,
                    "pullRequestUrl": pr_url,
                    "success": True,
                },
            )
        return "unknown", 404, {"error": f"fake hub: no route for {method} {path}"}

    @staticmethod
    def _decode_commit(repo: str, revision: str, query: dict, body: bytes) -> dict:
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        files = {}
        for line in lines[1:]:
            assert line["key"] == "file", f"expected only inline files, got {line['key']}"
            assert line["value"]["encoding"] == "base64"
            files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
        assert lines[0]["key"] == "header"
        return {"repo": repo, "revision": revision, "query": query, "header": lines[0]["value"], "files": files}

    def _discussion(self, repo: str, num: int) -> dict:
        return {
            "title": "PR",
            "num": num,
            "author": {"name": "tester"},
            "createdAt": "2025-01-01T00:00:00.000Z",
            "status": "draft",
            "repo": {"name": repo, "type": "model"},
            "isPullRequest": True,
            "changes": {"base": "refs/heads/main"},
            "filesWithConflicts": [],
            "events": [],
        }


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        timeout = 10  # socket timeout: a stuck client cannot pin a server thread

        def _serve(self) -> None:
            url = urlsplit(self.path)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            query = parse_qs(url.query)
            with hub.lock:
                step, status, payload = hub.route(self.command, url.path, query, body)
                if step in hub.fail:
                    status, message = hub.fail[step]
                    payload = {"error": message}
                hub.requests.append(
                    {
                        "method": self.command,
                        "path": url.path,
                        "query": query,
                        "step": step,
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                        "body": body,
                        "status": status,
                    }
                )
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _serve

        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

    return Handler


@pytest.fixture(params=["xet-pipeline", "plain-commit"])
def hub(request, monkeypatch):
    """A running fake Hub on 127.0.0.1, for both upload paths of huggingface_hub (with hf_xet installed
    upload_folder goes through its pipelined uploader, without it through create_commit)."""
    if request.param == "xet-pipeline":
        pytest.importorskip("hf_xet")
    monkeypatch.setattr(hub_constants, "HF_HUB_DISABLE_XET", request.param == "plain-commit")
    # conftest sets HF_HUB_OFFLINE=1 for the real Hub; this test talks only to its own loopback server.
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    fake = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    server.daemon_threads = True
    fake.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def folder(tmp_path) -> Path:
    out = tmp_path / "converted"
    (out / "sub").mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"model_type": "ma_llama", "hidden_size": 64}))
    (out / "README.md").write_text(
        "---\nbase_model: org/base\nlicense: apache-2.0\n---\n\n# Card, exactly as written\n"
    )
    (out / "model.safetensors").write_bytes(bytes(range(256)) * 2)  # binary, not UTF-8
    (out / "ma_core_stats.py").write_text("X = 1\n")
    (out / "sub" / "extra.txt").write_text("nested file\n")
    return out


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_push_uploads_every_file_unchanged(hub, folder):
    before = _snapshot(folder)
    url = push_folder(folder, REPO, token=TOKEN, endpoint=hub.base, commit_message="tiny push")

    assert len(hub.commits) == 1
    commit = hub.commits[0]
    assert commit["repo"] == REPO and commit["revision"] == "main"
    assert commit["header"]["summary"] == "tiny push"
    assert commit["files"] == before  # every file, same names, same bytes: README.md arrived unchanged
    assert url == f"{hub.base}/{REPO}/commit/{1:040x}"
    assert _snapshot(folder) == before
    # Only the loopback server was asked, with the token given.
    assert all(r["headers"].get("authorization") == f"Bearer {TOKEN}" for r in hub.requests)
    assert hub.requests[0]["step"] == "create"
    assert "branch" not in [r["step"] for r in hub.requests]


@pytest.mark.parametrize("private", [True, False])
def test_private_flag_reaches_server(hub, folder, private):
    push_folder(folder, REPO, private=private, token=TOKEN, endpoint=hub.base)
    create = json.loads(next(r for r in hub.requests if r["step"] == "create")["body"])
    assert create == {
        "name": "tiny-ma",
        "organization": "tester",
        "type": "model",
        "visibility": "private" if private else "public",
    }


def test_revision_creates_branch_and_commits_there(hub, folder):
    url = push_folder(folder, REPO, revision="ma-v1", token=TOKEN, endpoint=hub.base)
    steps = [r["step"] for r in hub.requests]
    assert steps.index("create") < steps.index("branch") < steps.index("preupload") < steps.index("commit")
    branch = next(r for r in hub.requests if r["step"] == "branch")
    assert branch["path"] == f"/api/models/{REPO}/branch/ma-v1"
    preupload = next(r for r in hub.requests if r["step"] == "preupload")
    assert preupload["path"].endswith("/preupload/ma-v1")
    assert hub.commits[0]["revision"] == "ma-v1"
    assert "/commit/" in url


def test_create_pr_reaches_server_and_returns_pr_url(hub, folder):
    url = push_folder(folder, REPO, create_pr=True, token=TOKEN, endpoint=hub.base)
    assert url == f"{hub.base}/{REPO}/discussions/{PR_NUM}"
    commit = hub.commits[0]
    opened = [json.loads(r["body"]) for r in hub.requests if r["step"] == "discussion" and r["method"] == "POST"]
    # The plain path asks the commit endpoint to open the PR; the xet pipeline opens it first, then
    # commits onto its ref. Either way the server is told to make a pull request.
    assert commit["query"].get("create_pr") == ["1"] or (
        opened and opened[0]["pullRequest"] is True and commit["revision"] == f"refs/pr/{PR_NUM}"
    )
    assert "branch" not in [r["step"] for r in hub.requests]


def test_create_pr_with_branch_is_refused_before_any_request(hub, folder):
    with pytest.raises(ValueError, match="pull request"):
        push_folder(folder, REPO, revision="ma-v1", create_pr=True, token=TOKEN, endpoint=hub.base)
    assert hub.requests == []


def test_failed_commit_names_the_step_and_leaves_folder_alone(hub, folder, monkeypatch):
    # The xet pipeline retries a failed commit with backoff (1 + 2 + 4 + 8 + 8 s); skip the waiting.
    monkeypatch.setattr(hub_http, "time", type("NoSleep", (), {"sleep": staticmethod(lambda s: None)}), raising=False)
    hub.fail["commit"] = (500, "fake hub: commit storage is down")
    before = _snapshot(folder)
    with pytest.raises(RuntimeError) as failure:
        push_folder(folder, REPO, token=TOKEN, endpoint=hub.base)
    message = str(failure.value)
    assert "upload" in message and "commit storage is down" in message
    assert any(r["step"] == "commit" and r["status"] == 500 for r in hub.requests)
    assert _snapshot(folder) == before


def test_failed_create_repo_names_the_step(hub, folder):
    hub.fail["create"] = (403, "fake hub: no write access to tester")
    hub.fail["unknown"] = (404, "fake hub: repo not found")  # create_repo then checks whether it exists
    with pytest.raises(RuntimeError, match="create repo") as failure:
        push_folder(folder, REPO, token=TOKEN, endpoint=hub.base)
    assert "no write access" in str(failure.value)
    assert not any(r["step"] == "commit" for r in hub.requests)


@pytest.mark.parametrize("missing", ["README.md", "config.json"])
def test_incomplete_folder_is_refused_before_any_request(hub, folder, missing):
    (folder / missing).unlink()
    before = _snapshot(folder)
    with pytest.raises(FileNotFoundError, match=missing):
        push_folder(folder, REPO, token=TOKEN, endpoint=hub.base)
    assert hub.requests == []
    assert _snapshot(folder) == before
