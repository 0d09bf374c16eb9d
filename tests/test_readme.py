"""The README's first screen works as written: its quick start runs and prints what it shows, its
two set-up commands exist, its Outputs list names everything a job writes, its links resolve."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from hf_otselect.job import run_job
from tests.conftest import REPO, SAMPLE

README = (REPO / "README.md").read_text(encoding="utf-8")


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```$", README, flags=re.S | re.M)


def test_the_first_screen_is_what_it_is_the_two_commands_and_the_quick_start():
    first = "\n".join(README.splitlines()[:30])
    assert "select_by_ot" in first.split("```")[0]  # what it is, in its first lines
    commands = [line.split("#")[0].strip() for line in _blocks("bash")[0].splitlines()]
    assert commands == ["make demo", "make test"]
    assert re.search(r"^(demo|test): ", (REPO / "Makefile").read_text(), re.M)
    code = _blocks("python")[0]
    assert code in first and len(code.strip().splitlines()) == 5


@pytest.mark.slow
def test_the_quick_start_prints_what_the_readme_shows(tmp_path):
    """The first Python block, run as written from the repository root in a fresh interpreter with
    an empty cache; its stdout must be the block that follows it."""
    code = _blocks("python")[0]
    shown = re.search(re.escape(code) + r"```\n\n```text\n(.*?)```", README, flags=re.S)
    assert shown, "the quick start's output block must follow it"
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == shown.group(1)


def test_every_docs_link_resolves():
    links = re.findall(r"\]\((docs/[^)#]+)", README)
    assert links and all((REPO / link).is_file() for link in links)


def test_the_outputs_list_names_everything_a_job_writes(tmp_path):
    listed = re.search(r"^Outputs of a job.*?```\nout/\n(.*?)```", README, flags=re.S | re.M).group(1)
    names = {line.split()[0].rstrip("/") for line in listed.splitlines()}
    out = run_job(__import__("hf_otselect").load_config(REPO / "configs" / "demo.yaml", [
        f"pool.path={SAMPLE / 'pool.jsonl'}", f"target.path={SAMPLE / 'target.jsonl'}", "pool.max_rows=20",
        "target.max_rows=5", "k=3", "method=random", "embedding.max_length=32", f"cache_dir={tmp_path / 'cache'}",
        f"output_dir={tmp_path / 'out'}", "report=true", "report_columns=[domain]",
    ]))
    written = {p.name for p in out.iterdir()}
    assert written >= {"report.json", "report_files", ".hf_otselect.json", "selected", "scored"}
    assert written <= names, sorted(written - names)
