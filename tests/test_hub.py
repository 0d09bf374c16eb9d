"""The dataset card and the Hub push, the push against a local stand-in for the Hub's HTTP API.

The stand-in (:class:`LocalHub`) is a small HTTP server on 127.0.0.1 in a thread of the test
process. It answers the requests ``huggingface_hub`` sends for ``create_repo``,
``list_repo_files``, the preupload check, the git-LFS batch and upload, and ``create_commit``, keeps
the committed files in memory and records every request. ``hf-otselect push`` runs in a child
process with ``HF_ENDPOINT`` pointing at it, so the real client and the real CLI do the talking; the
test then reads the uploaded README, parquet shards and ``selection.json`` back.

The Hub now stores large files through Xet; a Xet storage server is beyond a stand-in, so the child
runs with ``HF_HUB_DISABLE_XET=1`` and the client takes the git-LFS path the Hub still serves.
"""

from __future__ import annotations

import base64
import fnmatch
import getpass
import hashlib
import http.server
import io
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from datasets import Dataset, DatasetDict, load_dataset
from huggingface_hub import DatasetCard

from hf_otselect.hub import build_card, check_repo_id, config_from_card, public_provenance, push
from tests.conftest import REPO

FAKE_TOKEN = "hf_FAKEtokenDoNotLeak0123456789abcdef"
SERVER_LIFETIME_S = 120  # the server shuts itself down after this, whatever the test does


# ----------------------------------------------------------------------------------- the stand-in
class LocalHub(http.server.ThreadingHTTPServer):
    """An in-memory dataset Hub: repos, their files, LFS objects, and a log of every request."""

    daemon_threads = True

    def __init__(self, token: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.token = token
        self.repos: dict[str, dict] = {}  # repo_id -> {"visibility": "private" | "public", "files": {path: bytes}, "commits": [...]}
        self.lfs: dict[str, bytes] = {}  # sha256 -> content
        self.requests: list[dict] = []  # method, path, headers, body
        self.lock = threading.Lock()
        # Faults to inject, by endpoint (the handler's name): each a list of "hang" (accept, read the
        # request, never answer) or an HTTP status to answer, used up in order; then the endpoint works.
        self.faults: dict[str, list] = {}
        self.echo_authorization = False  # error bodies and X-Error-Message repeat the Authorization header
        self.closing = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> LocalHub:
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self._timer = threading.Timer(SERVER_LIFETIME_S, self.shutdown)
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.closing.set()  # releases the handlers told to hang
        self._timer.cancel()
        self.shutdown()
        self.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: LocalHub

    def log_message(self, *args: object) -> None:  # keep the test output clean
        pass

    # -- plumbing
    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                chunk = self.rfile.read(size + 2)[:size]
                if size == 0:
                    return out
                out += chunk
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reply(self, status: int, payload: object = None, headers: dict[str, str] | None = None) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _error_text(self, text: str) -> str:
        if self.server.echo_authorization:  # as a careless proxy or server does
            return f"{text}; request had Authorization: {self.headers.get('Authorization')}"
        return text

    def _error_headers(self) -> dict[str, str]:
        return {"X-Error-Message": self._error_text("refused")} if self.server.echo_authorization else {}

    def _authorised(self) -> bool:
        if self.headers.get("Authorization") == f"Bearer {self.server.token}":
            return True
        self._reply(401, {"error": self._error_text("Invalid credentials in Authorization header")}, self._error_headers())
        return False

    def _handle(self, method: str) -> None:
        body = self._body()
        path = urllib.parse.urlsplit(self.path).path
        with self.server.lock:
            self.server.requests.append({"method": method, "path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
        for pattern, handler in _ROUTES:
            m = re.fullmatch(pattern, f"{method} {path}")
            if m:
                with self.server.lock:
                    queue = self.server.faults.get(handler.__name__) or []
                    fault = queue.pop(0) if queue else None
                if fault == "hang":
                    self.server.closing.wait(SERVER_LIFETIME_S)
                    self.close_connection = True
                    return None
                if fault is not None:
                    return self._reply(fault, {"error": self._error_text(f"injected failure {fault}")}, self._error_headers())
                return handler(self, body, **m.groupdict())
        self._reply(404, {"error": f"the stand-in has no route for {method} {path}"})

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    # -- the Hub's endpoints
    def create_repo(self, body: bytes) -> None:
        if not self._authorised():
            return
        req = json.loads(body)
        assert req.get("type", "model") in ("dataset", "model")
        repo_id = f"{req['organization']}/{req['name']}"
        with self.server.lock:
            if repo_id in self.server.repos:
                return self._reply(409, {"error": "You already created this dataset repo", "url": f"{self.server.url}/datasets/{repo_id}"})
            self.server.repos[repo_id] = {"visibility": req.get("visibility"), "files": {}, "commits": []}
        self._reply(200, {"url": f"{self.server.url}/datasets/{repo_id}", "name": repo_id})

    def tree(self, body: bytes, repo: str, rev: str) -> None:
        if not self._authorised():
            return
        files = self.server.repos[repo]["files"]
        self._reply(200, [{"type": "file", "path": p, "size": len(c), "oid": hashlib.sha1(c).hexdigest()} for p, c in sorted(files.items())])

    def preupload(self, body: bytes, repo: str, rev: str) -> None:
        if not self._authorised():
            return
        # Like the Hub's default .gitattributes: parquet goes through LFS, text files are regular blobs.
        files = [{"path": f["path"], "uploadMode": "lfs" if f["path"].endswith((".parquet", ".safetensors")) else "regular", "shouldIgnore": False}
                 for f in json.loads(body)["files"]]
        self._reply(200, {"files": files})

    def lfs_batch(self, body: bytes, repo: str) -> None:
        if not self._authorised():
            return
        req = json.loads(body)
        assert req["operation"] == "upload" and "basic" in req["transfers"]
        objects = []
        for obj in req["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.server.lfs:
                entry["actions"] = {"upload": {"href": f"{self.server.url}/lfs-store/{obj['oid']}/{obj['size']}"}}
            objects.append(entry)
        self._reply(200, {"transfer": "basic", "objects": objects})

    def lfs_put(self, body: bytes, oid: str, size: str) -> None:
        # A presigned storage URL: no Authorization header; the content must match its announced hash.
        if hashlib.sha256(body).hexdigest() != oid or len(body) != int(size):
            return self._reply(400, {"error": "content does not match the announced oid/size"})
        with self.server.lock:
            self.server.lfs[oid] = body
        self._reply(200)

    def validate_yaml(self, body: bytes) -> None:
        # The Hub checks a README's front matter before the commit; the stand-in checks that it is a
        # YAML mapping and that the list fields the Hub's schema types as lists are lists.
        req = json.loads(body)
        errors = []
        match = re.match(r"---\n(.*?)\n---\n", req["content"], flags=re.S)
        meta = yaml.safe_load(match.group(1)) if match else None
        if not isinstance(meta, dict):
            errors.append({"message": "the front matter is not a YAML mapping"})
        else:
            errors += [{"message": f"'{k}' must be a list"} for k in ("size_categories", "task_categories", "tags", "configs")
                       if k in meta and not isinstance(meta[k], list)]
        self._reply(400 if errors else 200, {"errors": errors, "warnings": []})

    def commit(self, body: bytes, repo: str, rev: str) -> None:
        if not self._authorised():
            return
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        assert lines[0]["key"] == "header"
        with self.server.lock:
            files = dict(self.server.repos[repo]["files"])
            for line in lines[1:]:
                v = line["value"]
                if line["key"] == "file":
                    assert v["encoding"] == "base64"
                    files[v["path"]] = base64.b64decode(v["content"])
                elif line["key"] == "lfsFile":
                    if v["oid"] not in self.server.lfs:
                        return self._reply(422, {"error": f"LFS object {v['oid']} was never uploaded"})
                    files[v["path"]] = self.server.lfs[v["oid"]]
                elif line["key"] == "deletedFile":
                    files.pop(v["path"])
                else:
                    return self._reply(400, {"error": f"the stand-in does not handle {line['key']}"})
            self.server.repos[repo]["files"] = files
            commits = self.server.repos[repo]["commits"]
            commits.append(lines[0]["value"]["summary"])
            oid = hashlib.sha1(f"{repo}{len(commits)}".encode()).hexdigest()
        self._reply(200, {"commitUrl": f"{self.server.url}/datasets/{repo}/commit/{oid}", "commitOid": oid})


    def resolve(self, body: bytes, repo: str, rev: str, path: str, method: str) -> None:
        # A file download (hf_hub_download): HEAD for its metadata, then GET for its bytes.
        with self.server.lock:
            content = self.server.repos.get(repo, {}).get("files", {}).get(path)
            commit = hashlib.sha1(f"{repo}{len(self.server.repos.get(repo, {}).get('commits', []))}".encode()).hexdigest()
        if content is None:
            return self._reply(404, {"error": f"{path} not in {repo}"}, {"X-Error-Code": "EntryNotFound"})
        self.send_response(200)
        for k, v in {"Content-Length": str(len(content)), "ETag": f'"{hashlib.sha256(content).hexdigest()}"', "X-Repo-Commit": commit}.items():
            self.send_header(k, v)
        self.end_headers()
        if method == "GET":
            self.wfile.write(content)


_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
_KIND = r"(?:models|datasets)"  # model repositories (a fitted selector) and dataset repositories (a selection)
_ROUTES = [
    (r"POST /api/repos/create", _Handler.create_repo),
    (rf"GET /api/{_KIND}/{_REPO}/tree/(?P<rev>[^/]+)", _Handler.tree),
    (rf"POST /api/{_KIND}/{_REPO}/preupload/(?P<rev>[^/]+)", _Handler.preupload),
    (rf"POST /(?:datasets/)?{_REPO}\.git/info/lfs/objects/batch", _Handler.lfs_batch),
    (r"PUT /lfs-store/(?P<oid>[0-9a-f]{64})/(?P<size>\d+)", _Handler.lfs_put),
    (r"POST /api/validate-yaml", _Handler.validate_yaml),
    (rf"POST /api/{_KIND}/{_REPO}/commit/(?P<rev>[^/]+)", _Handler.commit),
    (rf"(?P<method>GET|HEAD) /(?:datasets/)?{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", _Handler.resolve),
]


@pytest.fixture
def hub():
    with LocalHub(FAKE_TOKEN) as server:
        yield server


def _cli_push(folder: Path, hub: LocalHub, cwd: Path, *extra: str, verbose: bool = True, token: str = FAKE_TOKEN,
              env_extra: dict[str, str] | None = None, timeout: float = SERVER_LIFETIME_S) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(TRANSFORMERS_OFFLINE="0",  # CI sets it, and huggingface_hub reads it as HF_HUB_OFFLINE
               HF_ENDPOINT=hub.url, HF_TOKEN=token, HF_HUB_DISABLE_XET="1", HF_HUB_VERBOSITY="debug",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HOME=str(cwd / "hf_home"), PYTHONPATH=str(REPO), **(env_extra or {}))
    flags = ["--verbose"] if verbose else []
    return subprocess.run([sys.executable, "-m", "hf_otselect.cli", *flags, "push", str(folder), "--repo-id", "user/selection", *extra],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


# ----------------------------------------------------------------------------------- fixtures
def _provenance(pool_path: str = "data/pool.jsonl", cache_dir: str | None = None, model: str | None = None) -> dict:
    from hf_otselect.config import load_config

    cfg = load_config(REPO / "configs" / "demo.yaml").to_dict()
    cfg["pool"]["path"] = pool_path
    cfg["cache_dir"] = cache_dir
    cfg["embedding"]["model"] = model
    return {
        "method": "got_d", "params": {"eps": 0.1}, "k": 3, "seed": 0, "model": model or "m", "model_revision": None,
        "rows": {"pool": 5, "target": 2, "selected": 3, "selected_unique": 3},
        "ot_distance": {"target_pool": 1.5, "target_selection": 0.5},
        "fingerprints": {"pool": "abc", "target": "def"},
        "embedding": {"model": model, "batch_size": 64},
        "config": cfg,
    }


SELECTED = {"text": ["aspirin binds", "kinase inhibits", "the receptor"], "domain": ["bio", "bio", "news"],
            "score": [3.0, 2.0, 1.0], "pool_index": [4, 0, 2]}


def _job_folder(root: Path, provenance: dict, layout: str) -> Path:
    folder = root / "out"
    selected = Dataset.from_dict(SELECTED)
    scored = Dataset.from_dict({k: v + v[:2] for k, v in SELECTED.items()})
    if layout == "datasetdict":  # the job's coming layout: load_from_disk(out) gives both splits
        DatasetDict({"scored": scored, "selected": selected}).save_to_disk(str(folder))
    else:  # today's: two folders
        scored.save_to_disk(str(folder / "scored"))
        selected.save_to_disk(str(folder / "selected"))
    (folder / "selection.json").write_text(json.dumps(provenance))
    return folder


@pytest.fixture
def finished(tmp_path):
    return _job_folder(tmp_path, _provenance(), "folders")


# ----------------------------------------------------------------------------------- card
def test_card_yaml_round_trips_the_provenance():
    prov = _provenance()
    card = build_card(prov, [3.0, 2.0, 1.0])
    meta = yaml.safe_load(str(card).split("---")[1])
    assert meta["hf_otselect"] == prov
    assert "GOT-D" in card.text and "0.5" in card.text
    assert meta["license"] == "unknown" and meta["size_categories"] == ["n<1K"]
    assert "source_datasets" not in meta  # a local pool file names nothing others can find
    assert config_from_card(DatasetCard(str(card))).to_dict() == prov["config"]
    hub_pool = DatasetCard(str(build_card(_provenance(pool_path="fancyzhx/ag_news"), [1.0]))).data.to_dict()
    assert hub_pool["source_datasets"] == ["fancyzhx/ag_news"]
    many = dict(prov, rows=dict(prov["rows"], selected=25_000))
    assert DatasetCard(str(build_card(many, [1.0]))).data.to_dict()["size_categories"] == ["10K<n<100K"]


def test_the_local_card_keeps_paths_and_the_public_one_does_not(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prov = _provenance(pool_path=str(tmp_path / "pool.jsonl"), cache_dir="/var/cache/bob/hf")
    local, public = build_card(prov, [1.0]), build_card(prov, [1.0], public=True)
    assert config_from_card(local).pool.path == str(tmp_path / "pool.jsonl")
    assert config_from_card(public).pool.path == "pool.jsonl" and config_from_card(public).cache_dir == "<local>/hf"
    assert str(tmp_path) not in str(public) and "/var/cache" not in str(public) and "bob" not in str(public)


def test_public_provenance_makes_paths_relative_or_redacts_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    home = str(Path.home())
    prov = {"pool": str(tmp_path / "data" / "pool.jsonl"), "cache": f"{home}/.cache/hf_otselect",
            "model": "/opt/models/alice/encoder", "note": f"read {tmp_path}/t.jsonl and ~/secret.txt",
            "spaced": "/home/alice smith/my data/pool.jsonl", "hub": "user/name", "url": "https://huggingface.co/datasets/user/name", "ratio": "1/2", "n": [3, "a/b"]}
    got = public_provenance(prov)
    assert got == {"pool": "data/pool.jsonl", "cache": "<local>/hf_otselect", "model": "<local>/encoder",
                   "note": "read t.jsonl and <local>/secret.txt", "spaced": "<local>/pool.jsonl", "hub": "user/name",
                   "url": "https://huggingface.co/datasets/user/name", "ratio": "1/2", "n": [3, "a/b"]}


@pytest.mark.parametrize("bad", ["no-slash", "a/b/c", "user/na me", "user/..", "", None, 5])
def test_malformed_repo_id_is_refused(bad):
    with pytest.raises(ValueError, match="The 'repo_id' parameter of push"):
        check_repo_id(bad)


def test_push_refuses_an_unfinished_folder(tmp_path):
    with pytest.raises(ValueError, match="'output_dir'.*finished selection"):
        push(tmp_path, "user/selection")
    (tmp_path / "selection.json").write_text("{}")
    DatasetDict({"scored": Dataset.from_dict({"a": [1]})}).save_to_disk(str(tmp_path / "dd"))
    (tmp_path / "dd" / "selection.json").write_text("{}")
    with pytest.raises(ValueError, match=r"'output_dir'.*splits \['scored'\]"):
        push(tmp_path / "dd", "user/selection")


# ----------------------------------------------------------------------------------- the push
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["folders", "datasetdict"])
def test_push_uploads_one_readme_with_merged_metadata_and_the_rows(tmp_path, hub, layout):
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    home = str(Path.home())
    # Absolute paths of the user's machine, as a job records them: one under the working folder,
    # one outside it (the cache), one a local model folder named after the user.
    prov = _provenance(pool_path=str(work / "data" / "pool.jsonl"), cache_dir=f"{home}/.cache/hf_otselect",
                       model="/srv/users/alice_secret/minilm")
    folder = _job_folder(tmp_path, prov, layout)
    proc = _cli_push(folder, hub, work, "--license", "cc-by-4.0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "user/selection"

    repo = hub.repos["user/selection"]
    assert repo["visibility"] == "private" and len(repo["commits"]) == 1  # data, card and provenance in one commit
    files = repo["files"]
    shards = sorted(p for p in files if p.endswith(".parquet"))
    assert shards == ["data/train-00000-of-00001.parquet"]
    assert set(files) == {"README.md", "selection.json", *shards}
    # The parquet went through LFS (uploaded to storage, committed by oid).
    assert any(r["method"] == "PUT" and r["path"].startswith("/lfs-store/") for r in hub.requests)

    # Rows: exactly the selection, in order.
    table = pq.read_table(io.BytesIO(files[shards[0]]))
    assert table.to_pydict() == SELECTED

    # One README: our prose plus the metadata push_to_hub writes plus the standard fields.
    card = DatasetCard(files["README.md"].decode())
    meta = card.data.to_dict()
    assert "# Selection made with hf_otselect" in card.text and "## Method" in card.text
    assert meta["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}]
    info = meta["dataset_info"]
    assert info["splits"] == [{"name": "train", "num_bytes": info["dataset_size"], "num_examples": 3}]
    assert info["download_size"] == len(files[shards[0]])
    assert [f["name"] for f in info["features"]] == list(SELECTED)
    assert meta["license"] == "cc-by-4.0" and meta["size_categories"] == ["n<1K"]
    assert meta["task_categories"] == ["text-generation", "fill-mask"] and "hf_otselect" in meta["tags"]
    assert all(fnmatch.fnmatch(s, p["path"]) for s in shards for p in meta["configs"][0]["data_files"])

    # The datasets loader reads the pushed repo through that metadata (a local copy of it).
    copy = tmp_path / "clone"
    for name, content in files.items():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes(content)
    loaded = load_dataset(str(copy))
    assert list(loaded) == ["train"] and loaded["train"].to_dict() == SELECTED

    # Provenance: relative where the path lies under the working folder, redacted elsewhere.
    pushed = json.loads(files["selection.json"])
    assert pushed["config"]["pool"]["path"] == "data/pool.jsonl" == meta["hf_otselect"]["config"]["pool"]["path"]
    assert pushed["config"]["cache_dir"] == "<local>/hf_otselect"
    assert pushed["embedding"]["model"] == "<local>/minilm"
    everything = b"".join(files.values()).decode("utf-8", errors="replace")
    for leak in (str(tmp_path), home, "alice_secret", "/srv/", getpass.getuser()):
        assert leak not in everything, leak

    # The token reached the server (so the check below means something) and nothing else.
    assert all(r["headers"].get("authorization") == f"Bearer {FAKE_TOKEN}" for r in hub.requests if not r["path"].startswith("/lfs-store/"))
    assert "DEBUG" in proc.stderr  # the child logged at debug level, and still:
    assert FAKE_TOKEN not in proc.stdout + proc.stderr + everything
    assert not any(FAKE_TOKEN in r["path"] or FAKE_TOKEN.encode() in r["body"] for r in hub.requests)


@pytest.mark.slow
def test_a_second_push_replaces_the_shards_of_the_first(tmp_path, hub):
    work = tmp_path / "work"
    work.mkdir()
    folder = _job_folder(tmp_path, _provenance(), "folders")
    # After a first push, the repo also holds shards of an older, larger push and a file of the
    # user's: the second push deletes the stale shards in its commit and leaves the rest.
    proc = _cli_push(folder, hub, work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = hub.repos["user/selection"]["files"]
    hub.repos["user/selection"]["files"] = dict(files, **{"data/train-00000-of-00003.parquet": b"old",
                                                          "data/train-00002-of-00003.parquet": b"old", "notes.md": b"kept"})
    proc = _cli_push(folder, hub, work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    repo = hub.repos["user/selection"]
    assert sorted(repo["files"]) == ["README.md", "data/train-00000-of-00001.parquet", "notes.md", "selection.json"]
    assert len(repo["commits"]) == 2


def test_push_logs_never_show_the_token(finished, monkeypatch, caplog):
    # Without a server: the first request fails; the error and the logs must not carry the token.
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_DISABLE_XET", True)
    with caplog.at_level(logging.DEBUG), pytest.raises(Exception) as err:
        push(finished, "user/selection", token=FAKE_TOKEN)
    assert FAKE_TOKEN not in caplog.text + str(err.value) + repr(err.value)


# ----------------------------------------------------------------------------------- network failures
@pytest.fixture
def online(hub, monkeypatch):
    """This process's huggingface_hub talks to the stand-in (CI runs the suite offline)."""
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", hub.url)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("hf-otselect: error:")]


@pytest.mark.parametrize(("endpoint", "how"), [("create_repo", "flag"), ("create_repo", "env"), ("commit", "flag")])
def test_a_hub_that_never_answers_fails_within_the_timeout_in_one_line(tmp_path, hub, endpoint, how):
    # The stand-in accepts the connection, reads the request and never answers: without a timeout
    # the push waited forever (the child is killed at 60 s here, which fails the test).
    work = tmp_path / "work"
    work.mkdir()
    folder = _job_folder(tmp_path, _provenance(), "folders")
    hub.faults[endpoint] = ["hang"] * 10
    extra, env = (["--timeout", "2"], None) if how == "flag" else ([], {"HF_HUB_DOWNLOAD_TIMEOUT": "2"})
    t0 = time.monotonic()
    proc = _cli_push(folder, hub, work, *extra, verbose=False, env_extra=env, timeout=60)
    elapsed = time.monotonic() - t0
    step = "create_repo" if endpoint == "create_repo" else "the commit"
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert _error_lines(proc.stderr) == [f"hf-otselect: error: The Hub at {hub.url} did not answer {step} within 2 s "
                                         "(set a longer timeout with --timeout, timeout= or HF_HUB_DOWNLOAD_TIMEOUT if the Hub is slow)."]
    assert "Traceback" not in proc.stderr
    assert elapsed < 45  # the interpreter's start and imports, then 2 s per request
    assert "user/selection" not in hub.repos or not hub.repos["user/selection"]["files"]


def test_the_library_push_times_out_and_leaves_the_shared_client_as_it_was(finished, hub, monkeypatch, online):
    from huggingface_hub.utils import get_session

    from hf_otselect.hub import HubError

    hub.faults["create_repo"] = ["hang"]
    before = get_session().timeout
    t0 = time.monotonic()
    with pytest.raises(HubError, match=r"did not answer create_repo within 0.5 s"):
        push(finished, "user/selection", token=FAKE_TOKEN, timeout=0.5)
    assert time.monotonic() - t0 < 10
    assert get_session().timeout == before  # the caller's client keeps its own settings
    for bad, exc in ((0, ValueError), (-1.0, ValueError), ("5", TypeError)):
        with pytest.raises(exc, match=r"The 'timeout' parameter of push must be a float in \(0.0, inf\]"):
            push(finished, "user/selection", token=FAKE_TOKEN, timeout=bad)
    with pytest.raises(ValueError, match=r"The 'retries' parameter of push must be an int in \[0, 10\]"):
        push(finished, "user/selection", token=FAKE_TOKEN, retries=-1)
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "soon")
    with pytest.raises(ValueError, match=r"The 'HF_HUB_DOWNLOAD_TIMEOUT' parameter of push \(environment variable\)"):
        push(finished, "user/selection", token=FAKE_TOKEN)


@pytest.mark.slow
def test_a_5xx_answer_is_retried_and_the_push_completes(tmp_path, hub):
    work = tmp_path / "work"
    work.mkdir()
    folder = _job_folder(tmp_path, _provenance(), "folders")
    hub.faults.update(create_repo=[500, 503], tree=[502], commit=[500])
    proc = _cli_push(folder, hub, work, verbose=False, timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(hub.repos["user/selection"]["files"]) == ["README.md", "data/train-00000-of-00001.parquet", "selection.json"]
    creates = [r for r in hub.requests if r["path"] == "/api/repos/create"]
    assert len(creates) == 3 and "The Hub answered 500 to create_repo; retrying in 1 s (retry 1 of 3)" in proc.stderr
    assert len(hub.repos["user/selection"]["commits"]) == 1


def test_retries_are_bounded_and_a_4xx_is_not_retried(finished, hub, monkeypatch, online):
    from hf_otselect.hub import HubError

    monkeypatch.setattr("hf_otselect._hub_http._BACKOFF_S", 0.01)
    hub.faults["create_repo"] = [500] * 5
    with pytest.raises(HubError, match=r"refused create_repo after 3 tries \(HTTP 500\)"):
        push(finished, "user/selection", token=FAKE_TOKEN, retries=2)
    assert sum(r["path"] == "/api/repos/create" for r in hub.requests) == 3
    hub.requests.clear()
    hub.faults["create_repo"] = [403]
    with pytest.raises(HubError, match=r"refused create_repo \(HTTP 403\)"):
        push(finished, "user/selection", token=FAKE_TOKEN)
    assert sum(r["path"] == "/api/repos/create" for r in hub.requests) == 1


OTHER_TOKEN = "my-endpoint-secret-not-hf-shaped-42"


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
@pytest.mark.parametrize(("case", "token"), [("403 echoing the token", FAKE_TOKEN), ("403 echoing a non-hf token", OTHER_TOKEN),
                                             ("401 for a wrong token", "hf_" + "W" * 34)], ids=["403", "403-not-hf-shaped", "401"])
def test_an_error_that_echoes_the_authorization_header_prints_no_token(tmp_path, hub, verbose, case, token):
    work = tmp_path / "work"
    work.mkdir()
    folder = _job_folder(tmp_path, _provenance(), "folders")
    hub.echo_authorization = True
    if case.startswith("403"):
        hub.token = token
        hub.faults["create_repo"] = [403]
    proc = _cli_push(folder, hub, work, verbose=verbose, token=token, timeout=60)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert any(token in r["headers"].get("authorization", "") for r in hub.requests)  # it was sent, and echoed
    assert token not in proc.stdout + proc.stderr
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and "<redacted>" in lines[0] and "refused create_repo" in lines[0], proc.stderr[-3000:]
    assert ("Traceback" in proc.stderr) == verbose


def test_redact_removes_registered_secrets_hf_tokens_and_bearer_values():
    from hf_otselect._redact import redact, remember_secret

    remember_secret("custom-secret-value-123")
    other = "hf_" + "a1B2" * 9
    text = f"token custom-secret-value-123 and {other}, Authorization: Bearer xyz.abc-def; hf_otselect hf_home HF_TOKEN"
    out = redact(text)
    assert "custom-secret-value-123" not in out and other not in out and "xyz.abc-def" not in out
    assert out.count("<redacted>") == 3 and "hf_otselect hf_home HF_TOKEN" in out
    assert redact(ValueError(f"bad {FAKE_TOKEN}")) == "bad <redacted>"


def test_log_records_of_every_logger_reach_their_handlers_redacted():
    code = f"""
import logging, warnings
from hf_otselect._redact import install_log_redaction, remember_secret
logging.basicConfig(level=logging.DEBUG)
install_log_redaction()
remember_secret("custom-secret-value-123")
other = logging.getLogger("somelib")
other.addHandler(logging.StreamHandler())  # a library's own handler, as huggingface_hub has
other.warning("sent %s and %s", "custom-secret-value-123", "Bearer abc.def")
try:
    raise RuntimeError("server said {FAKE_TOKEN}")
except RuntimeError:
    logging.getLogger("x").exception("failed")
warnings.warn("token {FAKE_TOKEN} in a warning")
logging.getLogger("y").info("%d", "not a number")  # a malformed call stays a log line
print("done")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr
    err = proc.stderr
    assert "custom-secret-value-123" not in err and FAKE_TOKEN not in err and "abc.def" not in err
    assert err.count("sent <redacted> and Bearer <redacted>") == 2  # its own handler and the root's
    assert "RuntimeError: server said <redacted>" in err and "token <redacted> in a warning" in err
    assert "(arguments ('not a number',))" in err
