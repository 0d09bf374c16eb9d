"""Safe defaults: no pickle, safe YAML, no remote code unless asked, no token leaks.

The source checks read the syntax tree (not the text), so a comment or docstring that *mentions*
pickle is fine and a call spelt across lines is still caught. The leak check runs a real job with
a fake Hub token in the environment and greps everything the job printed, logged or wrote.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "hf_otselect"
USER_FACING = [PACKAGE, REPO / "scripts"]
EVERYTHING = [*USER_FACING, REPO / "benchmarks"]
FAKE_TOKEN = "hf_FAKEtokenDoNotLeak0123456789abcdefXYZ"


def _sources(roots: list[Path]) -> list[Path]:
    return sorted(p for root in roots if root.is_dir() for p in root.rglob("*.py"))


def _calls(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _dotted(func: ast.AST) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _kw(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.AST | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(REPO)}:{node.lineno}"


def test_the_sources_are_parsed():
    # guards the checks below against silently reading nothing
    assert len(_sources([PACKAGE])) >= 10


def test_every_source_compiles_without_a_warning():
    # an invalid escape in a docstring only warns (and only when the .pyc is written); later Pythons refuse it
    import warnings

    for path in _sources([*EVERYTHING, REPO / "tests"]):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            compile(path.read_text(encoding="utf-8"), str(path), "exec")


def test_no_pickle_imports_or_pickle_based_loaders():
    bad = []
    for path in _sources(EVERYTHING):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                bad += [_where(path, node) for a in node.names if a.name.split(".")[0] in {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in {"pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}:
                bad.append(_where(path, node))
        for call in _calls(path):
            name = _dotted(call.func)
            if name.endswith(("pickle.load", "pickle.loads", "joblib.load")) or name in {"pd.read_pickle", "pandas.read_pickle"}:
                bad.append(f"{_where(path, call)} {name}")
    assert not bad, f"pickle-based code: {bad}"


def test_numpy_never_allows_pickle_and_the_package_says_so_explicitly():
    bad = []
    for path in _sources(EVERYTHING):
        for call in _calls(path):
            name = _dotted(call.func)
            if name.split(".")[-1] not in {"load", "save"} or name.split(".")[0] not in {"np", "numpy"}:
                continue
            flag = _kw(call, "allow_pickle")
            if flag is not None and not _is_const(flag, False):
                bad.append(f"{_where(path, call)} {name}(allow_pickle=...)")
            if name.endswith("load") and flag is None and PACKAGE in path.parents:
                bad.append(f"{_where(path, call)} {name} without allow_pickle=False")
    assert not bad, bad


def test_torch_load_only_with_weights_only():
    bad = [
        _where(path, call)
        for path in _sources(EVERYTHING)
        for call in _calls(path)
        if _dotted(call.func) == "torch.load" and not _is_const(_kw(call, "weights_only"), True)
    ]
    assert not bad, f"torch.load without weights_only=True: {bad}"


def test_yaml_is_read_with_safe_load_only():
    bad = []
    for path in _sources(EVERYTHING):
        for call in _calls(path):
            name = _dotted(call.func)
            if name in {"yaml.load", "yaml.load_all", "yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all"}:
                loader = _kw(call, "Loader")
                if not (loader is not None and _dotted(loader) in {"yaml.SafeLoader", "yaml.CSafeLoader"}):
                    bad.append(f"{_where(path, call)} {name}")
    assert not bad, f"unsafe YAML loading: {bad}"


def test_trust_remote_code_defaults_to_false_everywhere():
    seen, bad = 0, []
    for path in _sources(USER_FACING):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                positional = args.posonlyargs + args.args
                defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
                for arg, default in [*zip(positional, defaults), *zip(args.kwonlyargs, args.kw_defaults)]:
                    if arg.arg == "trust_remote_code":
                        seen += 1
                        # no default (a required argument: the caller decides) or False
                        if default is not None and not _is_const(default, False):
                            bad.append(f"{_where(path, node)} {node.name}(trust_remote_code=...) default is not False")
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == "trust_remote_code":
                seen += 1
                value = node.value
                if isinstance(value, ast.Call) and _dotted(value.func) == "field":  # dataclasses.field(default=False)
                    value = _kw(value, "default")
                if not _is_const(value, False):
                    bad.append(f"{_where(path, node)} field trust_remote_code is not False by default")
            elif isinstance(node, ast.Call) and _is_const(_kw(node, "trust_remote_code"), True):
                bad.append(f"{_where(path, node)} passes trust_remote_code=True")
    assert seen >= 3, "expected the embed functions, the config field and the scripts to expose the flag"
    assert not bad, bad


def test_the_config_and_embed_defaults_at_run_time():
    import inspect

    import hf_otselect
    from hf_otselect.config import EmbeddingConfig

    assert EmbeddingConfig().trust_remote_code is False
    for fn in (hf_otselect.embed, hf_otselect.iter_embeddings, sys.modules["hf_otselect.embed"].load_encoder):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False


@pytest.mark.slow
def test_a_job_never_prints_logs_or_writes_the_hub_token(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    env = {
        **os.environ, "HF_TOKEN": FAKE_TOKEN, "HUGGING_FACE_HUB_TOKEN": FAKE_TOKEN, "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "ds_cache"),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "hf_otselect.cli", "--verbose", "select", "--config", str(REPO / "configs/demo.yaml"),
         f"pool.path={REPO / 'data/sample/pool.jsonl'}", f"target.path={REPO / 'data/sample/target.jsonl'}",
         "pool.max_rows=40", "target.max_rows=6", "k=5", "embedding.max_length=32", "report=true",
         f"cache_dir={cache}", f"output_dir={out}"],
        capture_output=True, env=env, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    assert (out / "selection.json").is_file() and (out / "report.html").is_file()
    token = FAKE_TOKEN.encode()
    assert token not in proc.stdout and token not in proc.stderr
    written = [p for root in (out, cache, tmp_path / "ds_cache") for p in root.rglob("*") if p.is_file()]
    assert len(written) > 10
    leaks = [str(p) for p in written if token in p.read_bytes()]
    assert not leaks, f"the token was written to {leaks}"


# ----------------------------------------------------------------------------------------------
# a job deletes only what it wrote

# Where the package may remove a folder tree: the output folder's life cycle, and two folders
# that lie inside an output of ours (the ranks' shards in .partial/, report_files/ of a report).
RMTREE_ALLOWED = {"hf_otselect/outdir.py", "hf_otselect/job.py", "hf_otselect/report.py"}


def test_only_the_output_folder_module_removes_folder_trees():
    found = {
        str(path.relative_to(REPO)): _where(path, call)
        for path in _sources(USER_FACING)
        for call in _calls(path)
        if _dotted(call.func).endswith("rmtree")
    }
    assert "hf_otselect/outdir.py" in found
    assert set(found) <= RMTREE_ALLOWED, f"rmtree outside the reviewed places: {found}"
    # and the reviewed places in job.py/report.py remove a folder inside one the package made
    job = (PACKAGE / "job.py").read_text(encoding="utf-8")
    assert 'own = folder.with_name(f".{folder.name}-' in job and "shutil.rmtree(out" not in job


def _cli_select(tmp_path: Path, output_dir: Path, *, home: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **({"HOME": str(home)} if home else {})}
    return subprocess.run(
        [sys.executable, "-m", "hf_otselect.cli", "select", "--config", str(REPO / "configs/demo.yaml"),
         f"pool.path={REPO / 'data/sample/pool.jsonl'}", f"target.path={REPO / 'data/sample/target.jsonl'}",
         "pool.max_rows=20", "k=2", f"cache_dir={tmp_path / 'cache'}", f"output_dir={output_dir}", "overwrite=true"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )


def _plant(folder: Path) -> dict[Path, bytes]:
    files = {folder / "thesis.tex": b"\\documentclass{article}", folder / "runs" / "seed1" / "log.txt": b"loss 0.1\n" * 40}
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


@pytest.mark.parametrize("where", ["output_dir", "partial", "home"])
def test_a_hostile_output_dir_is_refused_in_one_line_and_the_users_files_stay(tmp_path, where):
    """A symlinked output_dir or .partial, or ~ itself, with overwrite=true: exit 2, one line, nothing deleted."""
    victim = tmp_path / "victim"
    planted = _plant(victim)
    if where == "output_dir":
        (tmp_path / "sel").symlink_to(victim, target_is_directory=True)
        proc = _cli_select(tmp_path, tmp_path / "sel")
    elif where == "partial":
        (tmp_path / "sel.partial").symlink_to(victim, target_is_directory=True)
        proc = _cli_select(tmp_path, tmp_path / "sel")
    else:
        proc = _cli_select(tmp_path, Path("~"), home=victim)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("hf-otselect: error: The 'output_dir'"), proc.stderr
    assert "Traceback" not in proc.stderr
    for path, data in planted.items():
        assert path.read_bytes() == data
    assert sorted(p.name for p in victim.iterdir()) == ["runs", "thesis.tex"]


# issue 13, item 4: untrusted YAML (job files, dataset cards) is bounded


def _alias_bomb(levels: int = 11, width: int = 8) -> str:
    """``width ** levels`` leaves (8**11 = 8.6e9 here) in a few hundred bytes of nested aliases."""
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + f"\npool: {{path: *a{levels}}}\ntarget: {{path: t.jsonl}}\n"


_MEASURE = """
import json, resource, sys
from hf_otselect.config import load_config
from hf_otselect.hub import config_from_card
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    (load_config if sys.argv[1] == "job" else config_from_card)(sys.argv[2])
    outcome = "accepted"
except ValueError as err:
    outcome = str(err)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"outcome": outcome, "grew_kib": after - before}))
"""


@pytest.mark.parametrize("kind", ["job", "card"])
def test_an_alias_bomb_is_refused_with_bounded_memory_and_one_line(tmp_path, kind):
    import json

    text = _alias_bomb()
    assert len(text.encode()) < 700
    path = tmp_path / ("bomb.yaml" if kind == "job" else "README.md")
    path.write_text(text if kind == "job" else f"---\nhf_otselect:\n  config:\n{''.join('    ' + ln + chr(10) for ln in text.splitlines())}---\ncard body\n")
    proc = subprocess.run([sys.executable, "-c", _MEASURE, kind, str(path)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["grew_kib"] < 20 * 1024, result  # peak RSS grew by less than 20 MiB (the issue saw > 1 GB)
    outcome = result["outcome"]
    assert "\n" not in outcome and len(outcome) < 400
    assert "is refused: found the anchor '&a0': anchors and aliases are not allowed" in outcome
    assert str(path) in outcome


def test_the_real_command_refuses_an_alias_bomb_with_one_line_and_exit_2(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(_alias_bomb(), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "hf_otselect.cli", "select", "--config", str(path)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"hf-otselect: error: The 'config' file '{path}' is refused: found the anchor '&a0': anchors and aliases are not "
        "allowed (they can expand without bound) (line 1, column 5)."]


def test_messages_show_a_huge_shared_structure_in_bounded_time_and_length():
    """What the old error path did with an expanded bomb: repr() of every leaf. Now bounded."""
    from hf_otselect._checks import param_error

    leaf: list = ["lol"] * 10
    for _ in range(12):  # 10**13 leaves through shared references
        leaf = [leaf] * 10
    msg = str(param_error("pool.path", "the job config", "a str", leaf))
    assert msg.startswith("The 'pool.path' parameter of the job config must be a str. Got [[[[...]")
    assert len(msg) < 320


def test_yaml_is_only_parsed_through_the_bounded_loader():
    """No YAML parser entry point in the package except :func:`hf_otselect.config.load_yaml`."""
    parsers = {"yaml.safe_load", "yaml.load", "yaml.load_all", "yaml.safe_load_all", "yaml.full_load", "yaml.unsafe_load",
               "yaml.compose", "yaml.parse", "DatasetCard.load", "RepoCard.load", "yaml.SafeLoader", "yaml.CSafeLoader"}
    bad = [f"{_where(path, call)} {_dotted(call.func)}" for path in _sources([PACKAGE]) for call in _calls(path)
           if _dotted(call.func) in parsers]
    assert not bad, f"YAML parsed outside load_yaml: {bad}"
    from hf_otselect.config import load_yaml

    assert load_yaml("a: 1\nb: [x, y]\n") == {"a": 1, "b": ["x", "y"]}
