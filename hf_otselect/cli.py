"""``hf-otselect``: run a selection job, push a selection, or write its report.

    hf-otselect select --config configs/demo.yaml [key=value ...]
    hf-otselect push OUTPUT_DIR --repo-id user/name [--public]
    hf-otselect report OUTPUT_DIR [--columns domain]
    hf-otselect fit --config configs/demo.yaml --out SELECTOR_DIR [--sample 0.1] [key=value ...]
    hf-otselect apply SELECTOR_DIR_OR_HUB_ID POOL OUTPUT_DIR --fraction 0.01   (or --threshold T)
    hf-otselect methods            (the methods and their parameters with defaults)
    hf-otselect --version

Several processes: ``accelerate launch --multi_gpu --num_processes 2 --num_machines 1 -m
hf_otselect.cli select --config ...`` (or ``torchrun --standalone --nproc_per_node 2 -m
hf_otselect.cli select ...``). The CLI holds no logic of its own: it parses, then calls the library.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import traceback
from typing import NoReturn

from ._redact import install_log_redaction, redact, remember_secret

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="hf-otselect", description="Optimal-transport data selection for Hugging Face datasets.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"hf-otselect {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("methods", help="list the selection methods and their parameters with defaults")

    sel = sub.add_parser("select", help="run a selection job from a YAML config")
    sel.add_argument("--config", help="YAML job file (see configs/)")
    sel.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. k=200 params.eps=0.05")

    push = sub.add_parser("push", help="push a finished selection and its card to the Hub")
    push.add_argument("output_dir")
    push.add_argument("--repo-id", required=True)
    push.add_argument("--public", action="store_true", help="create the repository as public (default private)")
    push.add_argument("--split", default="train")
    push.add_argument("--license", default="unknown", help="the card's license field (the pool's licence terms carry over)")
    push.add_argument("--timeout", type=float, default=None,
                      help="seconds each Hub request may wait (default $HF_HUB_DOWNLOAD_TIMEOUT, else 60)")
    push.add_argument("--retries", type=int, default=3, help="tries after the first of a request the Hub answers with 429 or 5xx")

    fit = sub.add_parser("fit", help="fit a selector from a YAML job (or key=value settings) and save it")
    fit.add_argument("--config", help="YAML job file: pool, target, method, params, embedding, seed are read")
    fit.add_argument("--out", required=True, help="folder to save the fitted selector in (save_pretrained)")
    fit.add_argument("--sample", type=_number, default=None, help="fit on a sample: a row count (int) or a fraction in (0, 1]")
    fit.add_argument("--vector-column", default=None, help="fit on this pool column of precomputed vectors instead of embedding texts")
    fit.add_argument("--overwrite", action="store_true", help="replace a selector saved in --out before")
    fit.add_argument("overrides", nargs="*", help="dotted key=value settings, e.g. pool.path=pool.jsonl method=got_d params.eps=0.05")

    app = sub.add_parser("apply", help="apply a saved or Hub selector to a pool in one streaming pass; write the kept rows")
    app.add_argument("selector", help="a folder written by fit/save_pretrained, or a Hub model id user/name")
    app.add_argument("pool", help="data file or glob (.jsonl, .csv, .parquet...), save_to_disk folder or Hub dataset id")
    app.add_argument("output_dir", help="receives data/*.parquet (the kept rows) and summary.json")
    how = app.add_mutually_exclusive_group(required=True)
    how.add_argument("--fraction", type=float, help="keep about this fraction: the fit's calibrated threshold for it")
    how.add_argument("--threshold", type=float, help="keep the rows whose score (sampling methods: key) is at least this")
    app.add_argument("--split", default="train")
    app.add_argument("--name", default=None, help="Hub dataset configuration name")
    app.add_argument("--column", default=None, help="text column (default: the selector's)")
    app.add_argument("--vector-column", default=None, help="read precomputed vectors from this column instead of embedding")
    app.add_argument("--max-rows", type=int, default=None, help="read only the first rows of the pool")
    app.add_argument("--batch-size", type=int, default=1000, help="rows embedded and scored together")
    app.add_argument("--shard-rows", type=int, default=100_000, help="kept rows per Parquet file")
    app.add_argument("--revision", default=None, help="Hub revision of the selector")
    app.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: CUDA when present)")
    app.add_argument("--overwrite", action="store_true", help="replace an output this command wrote before")

    rep = sub.add_parser("report", help="write report.html for a finished selection")
    rep.add_argument("output_dir")
    rep.add_argument("--columns", nargs="*", default=None, help="categorical columns to break the selection down by")
    rep.add_argument("--sample-rows", type=int, default=None,
                     help="rows the report reads at most (default: the job's report_sample_rows, else 20000)")
    rep.add_argument("--seed", type=int, default=None, help="seed of the report's keyed sample (default: the job's)")
    return parser


def _number(text: str) -> int | float:
    """``--sample``: ``1000`` is a row count, ``0.1`` a fraction."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a row count (int) or a fraction, got {text!r}") from None


# Exit statuses: 2 bad input (argument, config, data), 1 the environment failed (disk, network,
# permissions) or an unexpected error, 130 interrupted (128 + SIGINT, what shells report for Ctrl-C).
EXIT_BAD_INPUT, EXIT_ENVIRONMENT, EXIT_INTERRUPTED = 2, 1, 130
_BAD_INPUT = (ValueError, TypeError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, ImportError)
_NETWORK_PACKAGES = {"httpx", "httpx2", "requests", "urllib3", "huggingface_hub", "fsspec", "aiohttp"}


def _one_line(err: BaseException) -> str:
    """The error as one line: YAML and Hub errors carry newlines; a terminal wants the gist."""
    from ._checks import short_repr

    if isinstance(err, OSError) and err.strerror and err.filename is not None:  # the OS's own text, path shortened
        text = f"{err.strerror}: {short_repr(str(err.filename))}"
    else:
        text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 1000 else text[:1000] + "..."


def _is_environment(err: BaseException) -> bool:
    """Disk, permission and network failures: the input may be fine, the machine or network is not."""
    return isinstance(err, (OSError, MemoryError)) or any(
        c.__module__.split(".")[0] in _NETWORK_PACKAGES for c in type(err).__mro__[:-2]
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status.

    2 for a bad argument, config or data file; 1 for an environment failure (disk full, permission
    denied, network) or an unexpected error; 130 for Ctrl-C. Each prints one line on stderr and no
    traceback, unless ``--verbose``, which prints the traceback first.

    A process of a ``torchrun`` / ``accelerate launch`` group does not return: it ends through
    :func:`_end_group_process` with that status.
    """
    from .dist import process_rank

    code = _run(argv)
    if process_rank()[1] > 1:
        _end_group_process(code)
    return code


def _end_group_process(code: int) -> NoReturn:
    """End a launched process once its work is done and on disk, without interpreter finalisation.

    The exit handlers run first (they destroy the process group, flush the logs, remove temporary
    files); then the process exits at once. Finalisation is skipped because, after a job had
    written its output, one process of a two-process CI run aborted during it ("terminate called
    without an active exception", exit -6): torch's gloo back end can still hold tensors in its C++
    threads when the interpreter is torn down (pytorch/pytorch#179291), and the launcher then
    reports the finished job as failed. Nothing of ours is left to finalise at this point.
    """
    import atexit

    atexit._run_exitfuncs()  # the handlers the interpreter would run at exit, in the same order
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more to say on it
            pass
    os._exit(code)


def _run(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    _configure_logging(args.verbose)
    install_log_redaction()
    if args.command in ("select", "push", "report", "fit", "apply"):  # each may talk to the Hub; each imports it anyway
        _remember_user_token()
    try:
        if args.command == "select":
            from .config import load_config
            from .job import run_job

            out = run_job(load_config(args.config, args.overrides))
            if out is not None:
                _say(out)
        elif args.command == "push":
            from .hub import push

            _say(push(args.output_dir, args.repo_id, private=not args.public, split=args.split, license=args.license,
                      timeout=args.timeout, retries=args.retries))
        elif args.command == "fit":
            from .config import load_config
            from .fit_job import fit_from_config

            _say(fit_from_config(load_config(args.config, args.overrides), args.out, sample=args.sample,
                                 vector_column=args.vector_column, overwrite=args.overwrite))
        elif args.command == "apply":
            import json

            from .fit_job import apply_selector

            summary = apply_selector(args.selector, args.pool, args.output_dir, fraction=args.fraction, threshold=args.threshold,
                                     split=args.split, name=args.name, column=args.column, vector_column=args.vector_column,
                                     max_rows=args.max_rows, batch_size=args.batch_size, shard_rows=args.shard_rows,
                                     revision=args.revision, device=args.device, overwrite=args.overwrite)
            _say(json.dumps({k: summary[k] for k in ("rows_seen", "rows_kept", "threshold")} | {"output_dir": str(args.output_dir)}))
        elif args.command == "methods":
            _say(methods_text())
        elif args.command == "report":
            from .report import write_report

            _say(write_report(args.output_dir, columns=args.columns, sample_rows=args.sample_rows, seed=args.seed))
    except KeyboardInterrupt:
        _explain(args.verbose, "interrupted (Ctrl-C); finished cache shards are kept and a rerun resumes from them")
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - the CLI's one job here is to turn any failure into one line
        if (isinstance(err, _BAD_INPUT) and not isinstance(err, PermissionError)) or getattr(err, "errno", None) == errno.ENAMETOOLONG:
            _explain(args.verbose, _one_line(err))
            return EXIT_BAD_INPUT
        if _is_environment(err):
            _explain(args.verbose, _one_line(err))
            return EXIT_ENVIRONMENT
        _explain(args.verbose, f"{type(err).__name__}: {_one_line(err)} (an unexpected error; --verbose shows the traceback)")
        return EXIT_ENVIRONMENT
    return 0


def _configure_logging(verbose: bool) -> None:
    """One log per job: process 0 logs it; under ``torchrun`` the others log warnings and errors only, prefixed with their rank.

    Their progress bars (datasets, huggingface_hub) are turned off too: process 0's tell the
    job's progress, and N copies interleaved on one terminal tell nothing.
    """
    from .dist import process_rank

    rank, world = process_rank()
    if rank == 0:
        logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        return
    logging.basicConfig(level=logging.WARNING, format=f"[rank {rank}/{world}] %(levelname)s %(name)s: %(message)s")
    from datasets.utils.logging import disable_progress_bar
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bar()
    disable_progress_bars()


def methods_text() -> str:
    """Every registered method: its class, the first line of its docstring, its parameters with defaults.

    Read from the selectors' own signatures, so the list cannot drift from the code. Parameters
    go as keywords of ``select_by_ot`` (``eps=0.05``) or under ``params:`` in a job YAML.
    """
    import inspect

    from .selectors import available_selectors
    from .selectors.base import selector_class

    lines = ["Methods (select_by_ot(..., method=NAME, PARAM=VALUE); YAML: method: NAME, params: {PARAM: VALUE}):", ""]
    for name in available_selectors():
        cls = selector_class(name)
        summary = (inspect.getdoc(cls) or "").splitlines()[0] if inspect.getdoc(cls) else ""
        lines.append(f"{name}  ({cls.__name__}) {summary}")
        params = inspect.signature(cls.__init__).parameters.values()
        shown = [f"{p.name}={p.default!r}" for p in params if p.name != "self" and p.default is not inspect.Parameter.empty]
        lines.append("    " + (", ".join(shown) if shown else "(no parameters)"))
    return "\n".join(lines)


def _say(result: object) -> None:
    """Print a finished command's result; a reader that closed stdout (``| head -c0``) is no failure.

    The work is done and written by then, so a closed pipe loses only this line. Following the
    Python docs on SIGPIPE, stdout is pointed at ``/dev/null`` so the exit-time flush stays quiet.
    """
    try:
        print(redact(result), flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _remember_user_token() -> None:
    """Register the token ``huggingface_hub`` would send (``HF_TOKEN``, ``hf auth login``) for redaction."""
    try:
        from huggingface_hub import get_token

        remember_secret(get_token())
    except Exception:  # noqa: BLE001 - no token found is no token to hide; the hf_ pattern still applies
        pass


def _explain(verbose: bool, line: str) -> None:
    """Print the error line (and with ``--verbose`` the traceback first), both through :func:`redact`."""
    if verbose:
        print(redact(traceback.format_exc()).rstrip("\n"), file=sys.stderr)
    print(redact(f"hf-otselect: error: {line}"), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
