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

    def _authorised(self) -> bool:
        if self.headers.get("Authorization") == f"Bearer {self.server.token}":
            return True
        self._reply(401, {"error": "Invalid credentials in Authorization header"})
        return False

    def _handle(self, method: str) -> None:
        body = self._body()
        path = urllib.parse.urlsplit(self.path).path
        with self.server.lock:
            self.server.requests.append({"method": method, "path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
        for pattern, handler in _ROUTES:
            m = re.fullmatch(pattern, f"{method} {path}")
            if m:
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


def _cli_push(folder: Path, hub: LocalHub, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(TRANSFORMERS_OFFLINE="0",  # CI sets it, and huggingface_hub reads it as HF_HUB_OFFLINE
               HF_ENDPOINT=hub.url, HF_TOKEN=FAKE_TOKEN, HF_HUB_DISABLE_XET="1", HF_HUB_VERBOSITY="debug",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HOME=str(cwd / "hf_home"), PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "hf_otselect.cli", "--verbose", "push", str(folder), "--repo-id", "user/selection", *extra],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=SERVER_LIFETIME_S)


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
