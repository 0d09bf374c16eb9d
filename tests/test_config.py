from __future__ import annotations

from pathlib import Path

import pytest

from hf_otselect.config import SelectionConfig, load_config
from tests.conftest import REPO


def _write(tmp_path, text: str):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_shipped_configs_load_and_validate():
    names = sorted(p.stem for p in (REPO / "configs").glob("*.yaml") if p.stem != "prefinetune")  # a script's config
    assert {"demo", "got_d", "tsds", "random", "similarity", "dsir"} <= set(names)
    for name in names:
        config = load_config(REPO / "configs" / f"{name}.yaml")
        assert isinstance(config, SelectionConfig)
        assert config.pool.path and config.target.path


def test_overrides_are_typed_and_dotted():
    config = load_config(REPO / "configs" / "got_d.yaml", ["k=7", "params.eps=0.05", "pool.streaming=true", "overwrite=true"])
    assert config.k == 7 and isinstance(config.k, int)
    assert config.params["eps"] == 0.05
    assert config.pool.streaming is True and config.overwrite is True
    assert config.embedding.model is None  # default kept


def test_unknown_key_is_refused_with_known_keys(tmp_path):
    path = _write(tmp_path, "pool: {path: a.jsonl}\ntarget: {path: b.jsonl}\nbudget: 5\n")
    with pytest.raises(ValueError, match=r"Unknown config key 'budget'.*'k'"):
        load_config(path)
    with pytest.raises(ValueError, match=r"Unknown config key 'pool.colum'"):
        load_config(REPO / "configs" / "demo.yaml", ["pool.colum=text"])


def test_wrong_type_is_refused(tmp_path):
    path = _write(tmp_path, "pool: {path: a.jsonl}\ntarget: {path: b.jsonl}\nk: ten\n")
    with pytest.raises(TypeError, match=r"The 'k' parameter of the job config must be a int. Got 'ten' instead."):
        load_config(path)


def test_missing_target_is_refused(tmp_path):
    path = _write(tmp_path, "pool: {path: a.jsonl}\n")
    with pytest.raises(ValueError, match=r"'target.path'"):
        load_config(path)


def test_malformed_yaml_and_missing_file(tmp_path):
    path = _write(tmp_path, "pool: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_unsafe_yaml_tags_are_not_executed(tmp_path):
    path = _write(tmp_path, "pool: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(path)


def test_bad_values_fail_before_work():
    with pytest.raises(ValueError, match="'method'"):
        load_config(REPO / "configs" / "demo.yaml", ["method=magic"])
    with pytest.raises(ValueError, match="'k'"):
        load_config(REPO / "configs" / "demo.yaml", ["k=0"])
    with pytest.raises(ValueError, match="'hub.repo_id'"):
        load_config(REPO / "configs" / "demo.yaml", ["push_to_hub=true"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(REPO / "configs" / "demo.yaml", ["k"])


# ----------------------------------------------------------------------------------------------
# untrusted YAML is bounded (issue 13, item 4)

import json  # noqa: E402
import re  # noqa: E402

from hf_otselect.config import MAX_YAML_BYTES, MAX_YAML_DEPTH, load_yaml  # noqa: E402


def _bomb(levels: int, width: int, *, mapping: bool = False) -> str:
    """A "billion laughs" document: ``width ** levels`` leaves once its aliases are expanded."""
    lines = ["l0: &l0 " + ("{x: ha}" if mapping else "[ha]")]
    for i in range(1, levels + 1):
        refs = ", ".join(f"k{j}: *l{i - 1}" if mapping else f"*l{i - 1}" for j in range(width))
        lines.append(f"l{i}: &l{i} " + ("{" + refs + "}" if mapping else "[" + refs + "]"))
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("mapping", [False, True], ids=["sequences", "mappings"])
def test_an_alias_bomb_job_file_is_refused_at_its_first_anchor(tmp_path, mapping):
    text = _bomb(10, 7, mapping=mapping)  # 7**10 = 282 million leaves in well under 1 KB
    assert len(text) < 1200
    path = _write(tmp_path, text)
    with pytest.raises(ValueError) as err:
        load_config(path)
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 400
    assert msg.startswith(f"The 'config' file '{path}' is refused: found the anchor '&l0'")
    assert "(line 1, column 5)" in msg


def test_a_lone_alias_or_anchor_is_refused_with_its_line(tmp_path):
    with pytest.raises(ValueError, match=r"found the alias '\*nowhere'.*\(line 3, column 9\)"):
        load_yaml("pool:\n  path: a.jsonl\ntarget: *nowhere\n", "The 'config' file 'j.yaml'")
    with pytest.raises(ValueError, match=r"found the anchor '&p'.*\(line 2, column 7\)"):
        load_yaml("k: 5\npool: &p {path: a.jsonl}\n", "The 'config' file 'j.yaml'")


def test_duplicate_keys_name_the_key_the_lines_and_the_file(tmp_path):
    path = _write(tmp_path, "pool: {path: a.jsonl}\ntarget: {path: b.jsonl}\nk: 5\nseed: 1\nk: 50\n")
    with pytest.raises(ValueError, match=re.escape(f"The 'config' file '{path}' is refused: the key 'k' appears twice "
                                                   "(first at line 3) (line 5, column 1).")):
        load_config(path)
    nested = _write(tmp_path, "pool:\n  path: a.jsonl\n  column: text\n  column: body\ntarget: {path: b.jsonl}\n")
    with pytest.raises(ValueError, match=r"the key 'column' appears twice \(first at line 3\) \(line 4"):
        load_config(nested)


def test_nesting_and_size_are_capped(tmp_path):
    deep = _write(tmp_path, "params: " + "[" * (MAX_YAML_DEPTH + 5) + "]" * (MAX_YAML_DEPTH + 5) + "\n")
    with pytest.raises(ValueError, match=f"nesting deeper than {MAX_YAML_DEPTH} levels"):
        load_config(deep)
    big = _write(tmp_path, "# " + "x" * MAX_YAML_BYTES + "\n")
    with pytest.raises(ValueError, match=rf"The 'config' file '{re.escape(str(big))}' is larger than {MAX_YAML_BYTES} bytes"):
        load_config(big)


@pytest.mark.parametrize(
    ("override", "field", "value"),
    [
        ("k=010", "k", 10),  # YAML 1.1 (PyYAML's safe_load) reads 8
        ("seed=007", "seed", 7),
        ("params.eps=5e-2", "params", {"eps": 0.05}),  # YAML 1.1 reads the string '5e-2'
        ("params.tol=1E-4", "params", {"tol": 1e-4}),
        ("pool.split=2024-01-01", "pool.split", "2024-01-01"),  # YAML 1.1 reads a datetime.date
        ("hub.split=null", "hub.split", None),
    ],
)
def test_overrides_are_yaml_1_2_core_scalars(override, field, value):
    extra = ["hub.split=train"] if field == "hub.split" else []
    if field == "hub.split":  # str field: null is refused by type, shown as None
        with pytest.raises(TypeError, match=r"The 'hub.split' parameter of the job config must be a value of type str. Got None"):
            load_config(REPO / "configs" / "demo.yaml", [override])
        return
    config = load_config(REPO / "configs" / "got_d.yaml", [*extra, override])
    node = config
    for part in field.split("."):
        node = getattr(node, part)
    if isinstance(value, dict):
        assert {k: node[k] for k in value} == value and all(type(node[k]) is float for k in value)
    else:
        assert node == value and type(node) is type(value)


@pytest.mark.parametrize(
    ("override", "name", "shown"),
    [
        ("seed=0x1F", "seed", "'0x1F'"),  # YAML 1.1 reads 31
        ("k=0o17", "k", "'0o17'"),
        ("k=1_000", "k", "'1_000'"),
        ("overwrite=on", "overwrite", "'on'"),  # YAML 1.1 reads True
        ("report=No", "report", "'No'"),
        ("save_embeddings=y", "save_embeddings", "'y'"),
    ],
)
def test_yaml_1_1_forms_are_refused_by_the_field_type_not_reinterpreted(override, name, shown):
    with pytest.raises(TypeError, match=rf"The '{name}' parameter of the job config must be a \w+\. Got {re.escape(shown)} instead\."):
        load_config(REPO / "configs" / "demo.yaml", [override])


def test_the_same_scalar_rules_hold_in_job_files(tmp_path):
    path = _write(tmp_path, "pool: {path: a.jsonl}\ntarget: {path: b.jsonl}\nk: 0012\nseed: 11\nparams: {eps: 2e-2}\n")
    config = load_config(path)
    assert (config.k, config.seed, config.params["eps"]) == (12, 11, 0.02)
    with pytest.raises(TypeError, match=r"The 'overwrite' parameter of the job config must be a bool. Got 'yes' instead."):
        load_config(_write(tmp_path, "pool: {path: a.jsonl}\ntarget: {path: b.jsonl}\noverwrite: yes\n"))
    with pytest.raises(ValueError, match=r"'0x20' is not a decimal int \(line 3"):
        load_config(_write(tmp_path, "pool: {path: a.jsonl}\ntarget: {path: b.jsonl}\nk: !!int 0x20\n"))


def test_messages_never_show_an_unbounded_value():
    huge_list = "[" + ",".join(["7"] * 200_000) + "]"
    with pytest.raises(TypeError) as err:
        load_config(REPO / "configs" / "demo.yaml", [f"k={huge_list}"])
    assert len(str(err.value)) < 400 and str(err.value).startswith("The 'k' parameter of the job config must be a int. Got [7, 7,")
    with pytest.raises(ValueError) as err:
        load_config(REPO / "configs" / "demo.yaml", ["k=" + "9" * 6000])  # beyond Python's int-from-str limit
    assert len(str(err.value)) < 400 and "is not a decimal int" in str(err.value)
    with pytest.raises(ValueError) as err:
        load_config(REPO / "configs" / "demo.yaml", ["x" * 50_000 + "=1"])
    assert len(str(err.value)) < 1200 and str(err.value).startswith("Unknown config key 'xxx")


def test_a_config_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("pool: {path: caf\u00e9.jsonl}\ntarget: {path: b.jsonl}\n".encode("latin-1"))
    with pytest.raises(ValueError, match=re.escape(f"The 'config' file '{path}' is not UTF-8 text (byte 0xe9 at offset 16)")):
        load_config(path)
    bom = tmp_path / "bom.yaml"  # a UTF-8 BOM (Windows editors) is fine
    bom.write_bytes(b"\xef\xbb\xbfpool: {path: a.jsonl}\ntarget: {path: b.jsonl}\nk: 4\n")
    assert load_config(bom).k == 4


def _card_text(tmp_path, **config_changes) -> str:
    from hf_otselect.hub import build_card

    config = load_config(REPO / "configs" / "demo.yaml", [f"{k}={v}" for k, v in config_changes.items()])
    prov = {"method": config.method, "params": config.params, "seed": config.seed, "model": "bundled",
            "rows": {"pool": 10, "selected": 3, "selected_unique": 3}, "ot_distance": {}, "config": config.to_dict()}
    return str(build_card(json.loads(json.dumps(prov)), [0.1, 0.5, 0.9]))


def test_config_from_card_accepts_the_text_a_path_and_a_card(tmp_path):
    from huggingface_hub import DatasetCard

    from hf_otselect.hub import config_from_card

    text = _card_text(tmp_path, k=7, seed=3, **{"params.eps": 0.02})
    assert len(text) > 255  # longer than a file name may be (the old "File name too long"): the text form
    for source in (text, DatasetCard(text)):
        config = config_from_card(source)
        assert (config.k, config.seed, config.params) == (7, 3, {"eps": 0.02})
    (tmp_path / "README.md").write_text(text, encoding="utf-8")
    assert config_from_card(tmp_path / "README.md").k == 7
    assert config_from_card(str(tmp_path / "README.md")).k == 7
    with pytest.raises(FileNotFoundError, match=r"The 'card' file '.*nope\.md' does not exist"):
        config_from_card(str(tmp_path / "nope.md"))
    with pytest.raises(ValueError, match=r"The 'card' file name is too long to be a path: 'aaaa"):
        config_from_card("a" * 300)


def test_a_card_header_with_aliases_or_duplicates_is_refused(tmp_path):
    from hf_otselect.hub import config_from_card

    text = _card_text(tmp_path)
    bomb = "---\n" + _bomb(9, 9) + "hf_otselect: {config: *l9}\n---\nbody\n"
    with pytest.raises(ValueError, match=r"The 'card' text \(YAML header\) is refused: found the anchor '&l0'"):
        config_from_card(bomb)
    dup = text.replace("---\n", "---\ntags: [x]\n", 1)
    with pytest.raises(ValueError, match=r"the key 'tags' appears twice"):
        config_from_card(dup)


def test_relative_paths_in_a_config_file_are_read_from_its_folder(tmp_path, monkeypatch):
    folder = tmp_path / "proj" / "configs"
    folder.mkdir(parents=True)
    (tmp_path / "proj" / "data").mkdir()
    (tmp_path / "proj" / "data" / "pool.jsonl").write_text('{"text": "a"}\n')
    (folder / "job.yaml").write_text(
        "pool: {path: ../data/pool.jsonl}\ntarget: {path: user/some-hub-dataset}\noutput_dir: ../out\n", encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the job must not depend on where it is started from
    config = load_config(folder / "job.yaml")
    assert Path(config.pool.path) == tmp_path / "proj" / "data" / "pool.jsonl"
    assert config.target.path == "user/some-hub-dataset"  # a Hub id stays a Hub id
    assert Path(config.output_dir) == tmp_path / "proj" / "out"
    # an override is a shell argument: relative to the working directory
    assert load_config(folder / "job.yaml", ["output_dir=runs/a"]).output_dir == "runs/a"


def test_embedding_backend_keys_are_read_and_checked_up_front(tmp_path):
    """`embedding.backend` / `embedding.quantize` from YAML or the command line, refused in the
    template before any data is read."""
    assert load_config(REPO / "configs" / "got_d.yaml").embedding.backend == "torch"
    with pytest.raises(ValueError, match=r"The 'backend' parameter of SelectionConfig.embedding must be one of \['torch', 'onnx', 'openvino'\]. Got 'onnxruntime' instead"):
        load_config(REPO / "configs" / "got_d.yaml", ["embedding.backend=onnxruntime"])
    with pytest.raises(ValueError, match=r"The 'quantize' parameter of SelectionConfig.embedding must be None with backend='torch'"):
        load_config(REPO / "configs" / "got_d.yaml", ["embedding.quantize=int8"])
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    config = load_config(REPO / "configs" / "got_d.yaml", ["embedding.backend=onnx", "embedding.quantize=int8"])
    assert (config.embedding.backend, config.embedding.quantize) == ("onnx", "int8")
