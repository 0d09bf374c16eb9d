"""CPU encoder back ends: a transformers encoder exported to ONNX (run by ONNX Runtime) or OpenVINO, fp32 or int8.

:mod:`hf_otselect.embed` keeps its own tokenisation, length-sorted batching and pooling; a back end
replaces only the forward pass that turns ``(input_ids, attention_mask[, token_type_ids])`` into the
last hidden states ``(batch, tokens, hidden)``. So every back end pools, normalises and caches
exactly like the torch one.

How each model is made, with the library made for it:

- ``onnx``: ``torch.onnx.export`` (the dynamo exporter, dynamic batch and token axes) of the
  ``AutoModel`` loaded with eager attention; ``quantize="int8"``: ONNX Runtime's
  ``quantize_dynamic`` (int8 weights per output channel, activations quantised per batch at run
  time, no calibration data), the quantisation sentence-transformers'
  ``export_dynamic_quantized_onnx_model`` applies through optimum.
- ``openvino``: ``openvino.convert_model`` of that ONNX model; ``quantize="int8"``: NNCF's
  data-free ``compress_weights`` (int8 weights; OpenVINO's CPU plugin quantises the activations of
  those layers at run time). Inference runs with ``INFERENCE_PRECISION_HINT=f32``, so a CPU with
  bf16 units does not silently lower the precision.

We do not go through sentence-transformers' ``backend=`` or optimum: optimum-onnx and
optimum-intel pin transformers and torch releases other than the ones this package runs on.

Exported models are cached under ``<embedding cache>/exports/<key[:20]>/``, the key a SHA-256 of
the source model's file contents, the back end, the quantisation and the versions of the packages
that produce the file; each file is written atomically with its key and checksum beside it
(:mod:`hf_otselect.cache`) and verified when read, so a second run (or process) loads and never
exports again, and a changed setting or a retrained model exports anew.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from ._checks import check_choice, param_error
from .cache import read_checked, write_checked

logger = logging.getLogger(__name__)

__all__ = ["BACKENDS", "BackendEncoder", "check_backend", "export_key", "exported_files", "load_backend_encoder"]

BACKENDS = ("torch", "onnx", "openvino")
QUANTIZATIONS = (None, "int8")
#: The modules each back end imports, and the extra of this package that installs them.
_NEEDS = {"onnx": ("onnxruntime", "onnx", "onnxscript"), "openvino": ("openvino", "nncf", "onnx", "onnxscript")}
#: What produces each exported file: part of its key, so a new release of any of them exports anew.
_PRODUCERS = {"onnx": ("torch", "transformers", "onnx", "onnxscript"), "onnx-int8": ("onnxruntime",),
              "openvino": ("openvino",), "openvino-int8": ("nncf",)}
_EXPORT_VERSION = 1  # bump when the exporter code changes what it writes for the same key
_FILES = {"onnx": ("model.onnx",), "openvino": ("model.xml", "model.bin")}
_DIGESTS: dict[tuple[Any, ...], str] = {}


def check_backend(backend: Any, quantize: Any, device: str | None, owner: str) -> None:
    """Refuse an unknown back end or quantisation, int8 on torch, a GPU device with a CPU back end,
    and a back end whose packages are not installed (``ImportError`` naming the extra).

    Imports nothing: the packages are only looked up.
    """
    check_choice(backend, "backend", owner, list(BACKENDS))
    check_choice(quantize, "quantize", owner, list(QUANTIZATIONS))
    if backend == "torch":
        if quantize is not None:
            raise param_error("quantize", owner, "None with backend='torch' (int8 runs on backend='onnx' or 'openvino')", quantize)
        return
    if device is not None and not str(device).startswith("cpu"):
        raise param_error("device", owner, f"'cpu' or None with backend={backend!r} (a CPU back end)", device)
    missing = [m for m in _NEEDS[backend] if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"The {backend!r} encoder back end of {owner} needs the packages {', '.join(missing)}: "
                          f"pip install 'hf_otselect[{backend}]'")


def _versions(stage: str) -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in _PRODUCERS[stage]}


def _source_digest(folder: Path) -> str:
    """SHA-256 over the name and content of every file of a model folder (kept per process by stamp)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and ".git" not in p.parts)
    stamp = tuple((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    memo = (str(folder.resolve()), stamp)
    if memo not in _DIGESTS:
        h = hashlib.sha256()
        for p in files:
            name = str(p.relative_to(folder)).encode()
            h.update(len(name).to_bytes(8, "little") + name + p.stat().st_size.to_bytes(8, "little"))
            with open(p, "rb") as fh:
                while chunk := fh.read(1 << 22):
                    h.update(chunk)
        _DIGESTS[memo] = h.hexdigest()
    return _DIGESTS[memo]


def export_key(source: Path, backend: str, quantize: str | None) -> str:
    """The cache key of an exported model: source files, back end, quantisation, producer versions."""
    stages = ["onnx"] + ([] if backend == "onnx" else ["openvino"])
    if quantize:
        stages.append(f"{backend}-{quantize}")
    key = {"v": _EXPORT_VERSION, "source": _source_digest(source), "backend": backend, "quantize": quantize,
           "producers": {s: _versions(s) for s in stages}}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _source_folder(name: str, revision: str | None) -> Path:
    """The local folder of a model: the folder itself, or a Hub id's snapshot (downloaded if online)."""
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name, revision=revision))


def _export_onnx(source: Path, trust_remote_code: bool, out: Path) -> None:
    """``AutoModel`` (eager attention) -> one ONNX file whose output is the last hidden state."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    model = AutoModel.from_pretrained(source, trust_remote_code=trust_remote_code, attn_implementation="eager").eval()
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if "token_type_ids" in tok.model_input_names else [])

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any = None) -> Any:
            extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state

    ids = torch.full((2, 8), 1000, dtype=torch.long)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # a padded row, so the exported graph takes the masked path
    example = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    dims = {0: torch.export.Dim("batch", min=1), 1: torch.export.Dim("tokens", min=1)}
    logger.info("Exporting %s to ONNX (once: the file is cached)", source)
    with torch.inference_mode():
        torch.onnx.export(Hidden(), (), str(out), kwargs={n: example[n] for n in names}, input_names=names,
                          output_names=["last_hidden_state"], dynamic_shapes={n: dims for n in names},
                          dynamo=True, external_data=False)


def _quantize_onnx(src: Path, out: Path) -> None:
    """ONNX Runtime dynamic quantisation: int8 weights, activations quantised per batch.

    Per output channel, and only the products with a weight matrix (``MatMulConstBOnly``): with
    one scale per tensor, or with the attention products quantised too, the bundled MiniLM's
    vectors fell to cosine 0.91 (min over 100 texts) of fp32 on an AVX2 CPU; these settings keep
    0.987 (mean 0.992).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8, per_channel=True,
                     extra_options={"MatMulConstBOnly": True})


def _to_openvino(src: Path, quantize: str | None, out_xml: Path) -> None:
    """OpenVINO IR of an ONNX file; int8 weights with NNCF's data-free weight compression."""
    import openvino as ov

    model = ov.convert_model(str(src))
    if quantize == "int8":
        import nncf

        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    ov.save_model(model, str(out_xml), compress_to_fp16=False)


def exported_files(name: str, *, revision: str | None, trust_remote_code: bool, backend: str,
                   quantize: str | None, root: Path) -> dict[str, bytes]:
    """The verified bytes of the exported model's files (exported and cached on a miss).

    Parameters
    ----------
    name : str
        Local model folder or Hub id.
    backend : {"onnx", "openvino"}
    quantize : {None, "int8"}
    root : Path
        The exports folder (``<embedding cache>/exports``).

    Returns
    -------
    dict
        File name -> bytes: ``model.onnx``, or ``model.xml`` and ``model.bin``.
    """
    source = _source_folder(name, revision)
    key = export_key(source, backend, quantize)
    folder = root / key[:20]
    files = {f: read_checked(folder / f, key=f"exports/{key}/{f}") for f in _FILES[backend]}
    if all(v is not None for v in files.values()):
        return files  # type: ignore[return-value]
    with tempfile.TemporaryDirectory(prefix=".export-", dir=_make(root)) as tmp:
        work = Path(tmp)
        if backend == "onnx" and quantize is None:
            _export_onnx(source, trust_remote_code, work / "model.onnx")
        else:  # every other file starts from the (cached) fp32 ONNX model
            fp32 = exported_files(name, revision=revision, trust_remote_code=trust_remote_code, backend="onnx",
                                  quantize=None, root=root)["model.onnx"]
            (work / "fp32.onnx").write_bytes(fp32)
            if backend == "onnx":
                _quantize_onnx(work / "fp32.onnx", work / "model.onnx")
            else:
                _to_openvino(work / "fp32.onnx", quantize, work / "model.xml")
        files = {f: (work / f).read_bytes() for f in _FILES[backend]}
    for f, data in files.items():  # each atomic, under its key; a reader takes the set only when all verify
        write_checked(folder / f, data, key=f"exports/{key}/{f}")
    return files  # type: ignore[return-value]


def _make(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class BackendEncoder:
    """An exported encoder called like a transformers one: ``enc(**batch).last_hidden_state``.

    Parameters
    ----------
    files : dict
        The exported model's bytes (:func:`exported_files`).
    backend : {"onnx", "openvino"}
    threads : int
        Intra-op threads (torch's count, so every back end uses the cores the caller allowed).
    """

    def __init__(self, files: dict[str, bytes], backend: str, threads: int) -> None:
        self.backend = backend
        if backend == "onnx":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            self.session = ort.InferenceSession(files["model.onnx"], opts, providers=["CPUExecutionProvider"])
            self.inputs = {i.name for i in self.session.get_inputs()}
        else:
            import openvino as ov

            core = ov.Core()
            model = core.read_model(model=files["model.xml"].decode("utf-8"),
                                    weights=ov.Tensor(np.frombuffer(files["model.bin"], dtype=np.uint8)))
            self.compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                              "INFERENCE_NUM_THREADS": threads,
                                                              "PERFORMANCE_HINT": "LATENCY"})
            self.request = self.compiled.create_infer_request()
            self.inputs = {p.get_any_name() for p in self.compiled.inputs}

    def __call__(self, **batch: Any) -> SimpleNamespace:
        """Last hidden states ``(batch, tokens, hidden)`` float32 (a torch tensor) of torch int64 inputs."""
        import torch

        feed = {k: v.numpy() for k, v in batch.items() if k in self.inputs}
        if self.backend == "onnx":
            hidden = self.session.run(["last_hidden_state"], feed)[0]
        else:
            hidden = np.array(self.request.infer(feed)[self.compiled.output(0)], copy=True)
        return SimpleNamespace(last_hidden_state=torch.from_numpy(hidden))


def load_backend_encoder(name: str, *, revision: str | None, trust_remote_code: bool, backend: str,
                         quantize: str | None, root: Path) -> BackendEncoder:
    """Export (or read from the cache) and load the ``backend`` encoder of ``name``."""
    import torch

    files = exported_files(name, revision=revision, trust_remote_code=trust_remote_code, backend=backend,
                           quantize=quantize, root=root)
    return BackendEncoder(files, backend, torch.get_num_threads())
