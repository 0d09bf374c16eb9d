"""Selection jobs as dataclasses: YAML in, validated config out.

A job file is YAML read with :func:`load_yaml` (``yaml.SafeLoader``, bounded); every key must be a
field below (unknown keys are refused with the list of known ones), and ``key=value`` overrides from
the command line use dotted paths (``pool.path=...``, ``params.eps=0.05``). Values of overrides are
parsed as YAML 1.2 core scalars, so ``k=200`` is an int, ``k=010`` is 10 and ``overwrite=true`` a
bool; ``0x1F``, ``on`` and ``yes`` stay strings, which a field typed int or bool refuses by name.

Job files and dataset cards are untrusted input. :func:`load_yaml` refuses anchors and aliases
(a few hundred bytes of nested aliases expand to gigabytes once walked), duplicate keys (YAML says
they are an error; PyYAML keeps the last one silently), nesting deeper than 64 levels and documents
over 1 MiB, and reads every plain scalar by the YAML 1.2 core schema instead of PyYAML's YAML 1.1
one (where ``010`` is 8, ``0x1F`` is 31 and ``on`` is True).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ._checks import check_seed, param_error, short_repr
from ._suggest import did_you_mean

__all__ = [
    "DataConfig", "DecontaminateConfig", "DedupConfig", "EmbeddingConfig", "HubConfig", "PrefilterConfig",
    "SelectionConfig", "load_config", "load_yaml",
]

MAX_YAML_BYTES = 1 << 20
MAX_YAML_DEPTH = 64


class YAMLRefused(yaml.MarkedYAMLError):
    """A YAML construct refused on purpose (alias, anchor, duplicate key, depth, bad scalar)."""


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2 core scalars, no anchors or aliases, no duplicate keys.

    PyYAML offers no switch for any of these, hence the subclass: the composer refuses alias and
    anchor events before anything is built, ``construct_mapping`` refuses a key it has seen, and
    the implicit resolvers are replaced by the YAML 1.2 core schema (decimal ints only: hex and
    octal forms stay strings rather than being read silently as other numbers).
    """

    yaml_implicit_resolvers: dict = {}  # filled below; SafeLoader's YAML 1.1 table is not inherited

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise YAMLRefused(None, None, f"found the alias '*{short_repr(event.anchor, 40)[1:-1]}': anchors and aliases are "
                              "not allowed (they can expand without bound)", event.start_mark)
        if getattr(event, "anchor", None) is not None:
            raise YAMLRefused(None, None, f"found the anchor '&{short_repr(event.anchor, 40)[1:-1]}': anchors and aliases are "
                              "not allowed (they can expand without bound)", event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise YAMLRefused(None, None, f"nesting deeper than {MAX_YAML_DEPTH} levels", event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:
                raise YAMLRefused(None, None, "found a mapping key that is not a scalar", key_node.start_mark) from None
            line = key_node.start_mark.line + 1
            if first is not None:
                raise YAMLRefused(None, None, f"the key {short_repr(key, 80)} appears twice (first at line {first})", key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: Any) -> int:
        try:
            return int(self.construct_scalar(node))  # base 10: '010' is 10
        except ValueError:
            raise YAMLRefused(None, None, f"{short_repr(node.value, 60)} is not a decimal int", node.start_mark) from None

    def construct_yaml_float(self, node: Any) -> float:
        text = self.construct_scalar(node)
        special = {".inf": "inf", "+.inf": "inf", "-.inf": "-inf", ".nan": "nan"}
        try:
            return float(special.get(text.lower(), text))
        except ValueError:
            raise YAMLRefused(None, None, f"{short_repr(node.value, 60)} is not a float", node.start_mark) from None

    def construct_yaml_bool(self, node: Any) -> bool:
        text = self.construct_scalar(node)
        if text.lower() not in ("true", "false"):
            raise YAMLRefused(None, None, f"{short_repr(text, 60)} is not true or false", node.start_mark)
        return text.lower() == "true"


for _tag, _pattern, _first in (
    ("null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", list("tTfF")),
    ("int", r"^[-+]?[0-9]+$", list("-+0123456789")),
    ("float", r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
     list("-+.0123456789")),
):
    _BoundedLoader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(_pattern), _first)
_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader.construct_yaml_int)
_BoundedLoader.add_constructor("tag:yaml.org,2002:float", _BoundedLoader.construct_yaml_float)
_BoundedLoader.add_constructor("tag:yaml.org,2002:bool", _BoundedLoader.construct_yaml_bool)


def load_yaml(text: str, source: str = "The YAML text") -> Any:
    """Parse one untrusted YAML document, bounded (see the module docstring).

    Parameters
    ----------
    text : str
        The document (at most :data:`MAX_YAML_BYTES` of UTF-8).
    source : str
        How messages name the document, e.g. ``"The 'config' file 'job.yaml'"``.

    Returns
    -------
    object
        Plain dicts, lists, str, int, float, bool and None.

    Raises
    ------
    ValueError
        Malformed YAML, an anchor or alias, a duplicate key, too deep or too large; one message
        that names ``source`` and the line.
    """
    if len(text) > MAX_YAML_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_YAML_BYTES:
        raise ValueError(f"{source} is larger than {MAX_YAML_BYTES} bytes; a job config or card header is far smaller.")
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except YAMLRefused as err:
        mark = err.problem_mark
        raise ValueError(f"{source} is refused: {err.problem} (line {mark.line + 1}, column {mark.column + 1}).") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{source} is not valid YAML: {' '.join(str(err).split())}") from None
    finally:
        loader.dispose()


def check_text_size(text: str | int, source: str) -> None:
    """Refuse a job config or card over :data:`MAX_YAML_BYTES` of UTF-8: one rule for a file and a text.

    ``text`` is the text itself or, for a file, its size in bytes; ``source`` names it
    (``"The 'card' text"``, ``"The 'card' file 'README.md'"``).
    """
    size = text if isinstance(text, int) else (len(text) if len(text) > MAX_YAML_BYTES else len(text.encode("utf-8", "surrogatepass")))
    if size > MAX_YAML_BYTES:
        raise ValueError(f"{source} is larger than {MAX_YAML_BYTES} bytes ({size}); a job config or card is far smaller.")


def read_text_file(path: Path, name: str) -> str:
    """The UTF-8 text of a small user file, with one-line errors naming ``name`` and the file."""
    try:
        check_text_size(path.stat().st_size, f"The {name!r} file {short_repr(str(path))}")
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"The {name!r} file {short_repr(str(path))} does not exist.") from None
    except IsADirectoryError:
        raise ValueError(f"The {name!r} file {short_repr(str(path))} is a folder, not a file.") from None
    except PermissionError:
        raise PermissionError(f"The {name!r} file {short_repr(str(path))} cannot be read (permission denied).") from None
    except OSError as err:
        if err.errno != errno.ENAMETOOLONG:
            raise
        raise ValueError(f"The {name!r} file name is too long to be a path: {short_repr(str(path), 80)}.") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"The {name!r} file {short_repr(str(path))} is not UTF-8 text (byte 0x{data[err.start]:02x} "
                         f"at offset {err.start}); save it as UTF-8.") from None


@dataclass
class DataConfig:
    """Where a split comes from.

    Attributes
    ----------
    path : str
        A data file or glob (``.jsonl``/``.json``, ``.csv``, ``.tsv``, ``.parquet``, ``.txt``), a folder
        of data files, a folder written by ``Dataset.save_to_disk``, or a Hub dataset id (needs network).
    split : str
        Split to read, in ``datasets``' syntax: a name, or a slice of one (``train[:1000]``,
        ``train[10%:]``) unless ``streaming`` (a stream reads whole splits; use ``max_rows``). Plain
        data files are the one split ``train``; one that is not there is refused by name.
    column : str
        The text column.
    name : str or None
        Hub dataset configuration name.
    streaming : bool
        Read as an ``IterableDataset`` (embedded shard by shard with bounded memory).
    max_rows : int or None
        Keep only the first ``max_rows`` rows (for a quick trial run).
    """

    path: str = ""
    split: str = "train"
    column: str = "text"
    name: str | None = None
    streaming: bool = False
    max_rows: int | None = None


@dataclass
class EmbeddingConfig:
    """How texts become vectors (see :func:`hf_otselect.embed`).

    Attributes
    ----------
    model : str or None
        Local path or Hub id of the encoder; None means the bundled all-MiniLM-L6-v2, which
        ``sentence-transformers/all-MiniLM-L6-v2`` and ``bundled`` also name (offline).
    revision : str or None
        Hub revision (branch, tag or commit) of the encoder.
    batch_size : int
        Rows per forward pass.
    max_length : int
        Token limit per text (longer texts are truncated).
    pooling : str
        ``"mean"`` (masked mean) or ``"cls"``.
    normalize : bool
        L2-normalise the vectors.
    device : str or None
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; None picks CUDA when present.
    trust_remote_code : bool
        Allow model code from the Hub. Off unless you set it.
    shard_rows : int
        Rows per cached embedding shard: the unit a killed job resumes from (finished shards are
        never recomputed).
    backend : str
        ``"torch"``, or a CPU back end run from a cached export: ``"onnx"`` (ONNX Runtime, extra
        ``hf_otselect[onnx]``) or ``"openvino"`` (extra ``hf_otselect[openvino]``).
    quantize : str or None
        ``"int8"`` weights on the ``onnx`` or ``openvino`` back end; None keeps fp32.
    """

    model: str | None = None
    revision: str | None = None
    batch_size: int = 64
    max_length: int = 256
    pooling: str = "mean"
    normalize: bool = True
    device: str | None = None
    trust_remote_code: bool = False
    shard_rows: int = 4096
    backend: str = "torch"
    quantize: str | None = None


@dataclass
class PrefilterConfig:
    """Source pre-filter before the selection (Kang et al. 2024; :mod:`hf_otselect.prefilter`).

    Needs ``source_column`` in the job. The ranking goes to ``selection.json`` (``prefilter``),
    the report and ``prefilter/`` in the output folder.

    Attributes
    ----------
    keep : int or None
        Keep the ``keep`` sources nearest the target by Sinkhorn divergence (the debiased OT
        distance, on equal-size samples of every source; paper: 2 of 7).
    max_distance : float or None
        Keep only sources whose divergence is at most this (with ``keep`` too, both must hold).
    sample_size : int
        Most rows used per source (paper: 10,000); every source is compared on chunks of
        ``min(sample_size, smallest source)`` rows, so a small source is not ranked by its size.
    eps : float
        Entropic regularisation of the OT terms (absolute).
    """

    keep: int | None = 2
    max_distance: float | None = None
    sample_size: int = 10_000
    eps: float = 0.1


@dataclass
class DedupConfig:
    """Near-duplicate guard for any selector (:mod:`hf_otselect.dedup`).

    Attributes
    ----------
    radius : float
        Euclidean distance on L2-normalised embeddings in ``(0, 2]`` (0.2 is cosine 0.98): no two
        chosen rows closer than this (greedy), or the Epanechnikov kernel radius (kde).
    mode : str
        ``auto`` (greedy for top-k and sampling without replacement, kde for sampling with
        replacement), ``greedy`` or ``kde``.
    """

    radius: float = 0.2
    mode: str = "auto"


@dataclass
class DecontaminateConfig(DataConfig):
    """A "never train on this" split (e.g. the target's evaluation split) and how close is too close.

    Pool rows near it are removed before scoring; counts (total, per reason, per source) go to
    ``selection.json`` (``decontamination``) and the removed rows to ``decontaminated/``. The data
    keys are those of :class:`DataConfig`.

    Attributes
    ----------
    radius : float
        Drop pool rows within this Euclidean distance of a held-out row (unit vectors; 0.3 is cosine
        0.955).
    ngram : int or None
        Also drop pool rows sharing a word n-gram of this length (lower-cased, whitespace-split)
        with a held-out row; null turns the n-gram test off.
    """

    radius: float = 0.3
    ngram: int | None = 13


@dataclass
class HubConfig:
    """Where ``push_to_hub`` sends the selected split.

    Attributes
    ----------
    repo_id : str or None
        ``user/name`` of the dataset repository.
    private : bool
        Create the repository as private.
    split : str
        Split name of the pushed rows.
    """

    repo_id: str | None = None
    private: bool = True
    split: str = "train"


@dataclass
class SelectionConfig:
    """A selection job.

    Attributes
    ----------
    pool : DataConfig
        The candidate corpus.
    target : DataConfig
        The target examples that drive the selection.
    negative_target : DataConfig or None
        Examples to move away from (GOT-D only), e.g. toxic text.
    method : str
        Registered selector name: ``got_d``, ``tsds``, ``random``, ``similarity``, ``dsir``.
    k : int
        How many rows to select.
    params : dict
        Keyword arguments of the selector (e.g. ``eps`` for GOT-D, ``alpha`` for TSDS).
    embedding : EmbeddingConfig
        Encoder settings, shared by pool and targets.
    seed : int
        Seed for every random choice.
    output_dir : str
        Folder that receives ``scored/``, ``selected/``, ``selection.json`` and the report.
    overwrite : bool
        Replace an existing ``output_dir`` (refused otherwise).
    score_column : str
        Name of the score column in the outputs.
    cache_dir : str or None
        Embedding and score cache; None means ``$HF_DATASETS_CACHE/hf_otselect``.
    report : bool
        Write ``report.html`` at the end of the job.
    report_columns : list of str
        Categorical pool columns whose make-up the report shows (e.g. ``domain``).
    report_sample_rows : int
        Rows the report reads at most (>= 2, default 20,000): a sample keyed by (seed, row index)
        for its projection, examples, near-duplicates and budget curve. Every other figure comes
        from summaries reduced where the rows live, so the report's memory does not grow with the pool.
    save_embeddings : bool
        Keep the pool and target vectors in ``output_dir/embeddings/`` (the report uses them).
    push_to_hub : bool
        Push the selected split and its card when the job is done.
    hub : HubConfig
        Repository settings for the push.
    source_column : str or None
        Pool column naming each row's source (``domain``...): ranked by the pre-filter, and the
        breakdown of the decontamination counts.
    prefilter : PrefilterConfig or None
        Source pre-filter; null (default) keeps every source.
    dedup : DedupConfig or None
        Near-duplicate guard; null (default) turns it off.
    decontaminate : DecontaminateConfig or None
        Held-out split whose (near) copies are removed from the pool; null (default) turns it off.
    dist_timeout_s : float or None
        Under ``torchrun`` / ``accelerate launch``: seconds a process waits for the others at any
        collective before the job fails with one line (a crashed, hung or slower process); null
        means ``$HF_OTSELECT_DIST_TIMEOUT`` or 1800.
    """

    pool: DataConfig = field(default_factory=DataConfig)
    target: DataConfig = field(default_factory=DataConfig)
    negative_target: DataConfig | None = None
    method: str = "got_d"
    k: int = 100
    params: dict[str, Any] = field(default_factory=dict)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    seed: int = 0
    output_dir: str = "selection_output"
    overwrite: bool = False
    score_column: str = "score"
    cache_dir: str | None = None
    report: bool = True
    report_columns: list[str] = field(default_factory=list)
    report_sample_rows: int = 20_000
    save_embeddings: bool = True
    push_to_hub: bool = False
    hub: HubConfig = field(default_factory=HubConfig)
    source_column: str | None = None
    prefilter: PrefilterConfig | None = None
    dedup: DedupConfig | None = None
    decontaminate: DecontaminateConfig | None = None
    dist_timeout_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (what ``selection.json`` and the dataset card record)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SelectionConfig:
        """Build and validate a config from its plain-dict form (unknown keys and wrong types refused)."""
        return _build(cls, data, "").validate()

    def validate(self) -> SelectionConfig:
        """Check the values that need no data; raise before any work is done."""
        from ._checks import check_int
        from .selectors import available_selectors

        owner = "SelectionConfig"
        if not self.pool.path:
            raise param_error("pool.path", owner, "a data file, folder or Hub id", self.pool.path)
        if not self.target.path:
            raise param_error("target.path", owner, "a data file, folder or Hub id", self.target.path)
        if self.method not in available_selectors():
            raise param_error("method", owner, f"one of {available_selectors()}", self.method)
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise param_error("k", owner, "an int >= 1", self.k)
        check_seed(self.seed, "seed", owner)
        check_int(self.report_sample_rows, "report_sample_rows", owner, 2)
        for side in ("pool", "target", "negative_target", "decontaminate"):
            spec = getattr(self, side)
            if spec is not None and spec.max_rows is not None:
                check_int(spec.max_rows, f"{side}.max_rows", owner, 1)
        if self.push_to_hub and not self.hub.repo_id:
            raise param_error("hub.repo_id", owner, "a repository id such as 'user/name' when push_to_hub is true", None)
        self._validate_pipeline(owner)
        self._check_work_settings()
        if self.dist_timeout_s is not None:
            from .dist import resolve_timeout

            resolve_timeout(self.dist_timeout_s, "dist_timeout_s", owner)
        return self

    def _check_work_settings(self) -> None:
        """Selector parameters and encoder settings, checked before any data is read or written."""
        from .devices import check_solver_device
        from .embed import check_embedding_settings
        from .selectors import get_selector

        selector = get_selector(self.method, **self.params)  # unknown keys, bad values (eps < 0...) fail here
        check_solver_device(selector)
        if selector.needs_text:
            return
        e = self.embedding
        check_embedding_settings(
            e.model, owner="SelectionConfig.embedding", batch_size=e.batch_size, device=e.device,
            max_length=e.max_length, normalize=e.normalize, pooling=e.pooling, revision=e.revision,
            trust_remote_code=e.trust_remote_code, shard_rows=e.shard_rows, backend=e.backend, quantize=e.quantize,
        )


    def check_environment(self) -> SelectionConfig:
        """Check the cache folder the job will write, before any data is read: raise with one line.

        It and its ``embeddings/``, ``scores/`` and ``streams/`` must be writable folders (see
        :func:`hf_otselect.cache.check_cache_dir`). (``output_dir`` is checked by
        :class:`hf_otselect.outdir.OutputFolder`, which owns the output folder's life cycle.)
        """
        from .cache import check_cache_dir

        check_cache_dir(self.cache_dir, "SelectionConfig")
        return self

    def _validate_pipeline(self, owner: str) -> None:
        """The pre-filter, guard and decontamination sections (same checks as select_by_ot)."""
        from ._checks import check_choice, check_float, check_int

        if self.prefilter is not None:
            from .prefilter import check_prefilter

            check_prefilter(dataclasses.asdict(self.prefilter), owner)
            if not self.source_column:
                raise param_error("source_column", owner, "the pool column naming each row's source when prefilter is set", self.source_column)
        if self.dedup is not None:
            from .dedup import DEDUP_MODES

            check_float(self.dedup.radius, "dedup.radius", owner, 0.0, 2.0, low_open=True)
            check_choice(self.dedup.mode, "dedup.mode", owner, list(DEDUP_MODES))
        if self.decontaminate is not None:
            if not self.decontaminate.path:
                raise param_error("decontaminate.path", owner, "a data file, folder or Hub id", self.decontaminate.path)
            check_float(self.decontaminate.radius, "decontaminate.radius", owner, 0.0, 2.0, low_open=True)
            if self.decontaminate.ngram is not None:
                check_int(self.decontaminate.ngram, "decontaminate.ngram", owner, 1)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (tp, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise param_error(where or "config", "the job config", f"a mapping of {cls.__name__} fields", data, exc=TypeError)
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(known), key=str)
    if unknown:
        name = f"{where}.{unknown[0]}" if where else unknown[0]
        hint = did_you_mean(unknown[0], known)
        raise ValueError(f"Unknown config key {short_repr(name)}.{hint} Known keys{' of ' + where if where else ''}: {known}")
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        kwargs[key] = _coerce(hints[key], value, path)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise param_error(path, "the job config", f"a value of type {getattr(inner, '__name__', inner)}", None, exc=TypeError)
    if dataclasses.is_dataclass(inner):
        return _build(inner, value, path)
    origin = typing.get_origin(inner)
    if origin is dict:
        if not isinstance(value, dict):
            raise param_error(path, "the job config", "a mapping", value, exc=TypeError)
        return dict(value)
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise param_error(path, "the job config", "a list of str", value, exc=TypeError)
        return list(value)
    if inner is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if inner in (int, float, bool, str):
        if not isinstance(value, inner) or (inner is int and isinstance(value, bool)):
            raise param_error(path, "the job config", f"a {inner.__name__}", value, exc=TypeError)
        return value
    return value


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[keys[-1]] = value


#: Fields that name files or folders. A relative path written in a config file means a path next to
#: that file (so a job runs the same from any working directory); one given as an override means a
#: path from the working directory, as a shell argument does.
_OUTPUT_PATHS = ("output_dir", "cache_dir")
_INPUT_PATHS = ("pool.path", "target.path", "negative_target.path", "decontaminate.path", "embedding.model")


def path_from_file(value: Any, base: Path, *, must_exist: bool) -> Any:
    """A relative path written in a config file, read from that file's folder ``base``.

    Output folders (``must_exist=False``) always are; an input (``must_exist=True``) only when it
    exists there (a file, a folder or a glob's match), since the same field also takes a Hub id
    such as ``"user/dataset"`` or a name such as ``"bundled"``. Absolute paths, ``~`` paths and
    non-strings are returned unchanged. The scripts' YAML files follow the same rule.
    """
    import glob

    if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute():
        return value
    candidate = os.path.normpath(base / value)  # lexical: a link in the path is never followed here
    if must_exist and not (os.path.exists(candidate) or glob.glob(candidate)):
        return value
    return candidate


def _paths_from(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """``data`` with the relative paths it names resolved against ``base`` (see :func:`path_from_file`)."""
    out = dict(data)
    for key in _OUTPUT_PATHS:
        if key in out:
            out[key] = path_from_file(out[key], base, must_exist=False)
    for dotted in _INPUT_PATHS:
        section, field = dotted.split(".")
        if isinstance(out.get(section), dict) and field in out[section]:
            out[section] = {**out[section], field: path_from_file(out[section][field], base, must_exist=True)}
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> SelectionConfig:
    """Read a job config from YAML and apply ``key=value`` overrides.

    Parameters
    ----------
    path : str or Path or None
        YAML file. None starts from the defaults. Relative paths in it are read from the file's
        folder (data and model paths when they exist there; ``output_dir`` and ``cache_dir``
        always); relative paths in ``overrides`` from the working directory.
    overrides : sequence of str
        ``dotted.key=value`` items; values are parsed as YAML 1.2 core scalars (``010`` is 10;
        ``0x1F``, ``on``, ``yes`` are strings, refused by a field typed int or bool).

    Returns
    -------
    SelectionConfig
        Validated (:meth:`SelectionConfig.validate`).

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        Malformed YAML, an anchor or alias, a duplicate key, a file that is not UTF-8, an unknown
        key, a malformed override or an invalid value.
    TypeError
        A value of the wrong type.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"The 'config' file {short_repr(str(path))} does not exist.")
        source = f"The 'config' file {short_repr(str(path))}"
        loaded = load_yaml(read_text_file(path, "config"), source)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise param_error("config", "load_config", "a YAML mapping at the top level", type(loaded).__name__, exc=TypeError)
        data = _paths_from(loaded, path.resolve().parent)
    for item in overrides:
        if not isinstance(item, str):
            raise param_error("overrides", "load_config", "items of the form key=value (str)", item, exc=TypeError)
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise param_error("overrides", "load_config", "items of the form key=value", item)
        value = load_yaml(raw, f"The override {short_repr(item)}") if raw.strip() else None
        _set_dotted(data, key.strip(), value)
    return SelectionConfig.from_dict(data)
