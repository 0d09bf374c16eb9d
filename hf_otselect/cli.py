"""``hf-otselect``: run a selection job, push a selection, or write its report.

    hf-otselect select --config configs/demo.yaml [key=value ...]
    hf-otselect push OUTPUT_DIR --repo-id user/name [--public]
    hf-otselect report OUTPUT_DIR [--columns domain]

Several processes: ``accelerate launch --multi_gpu --num_processes 2 --num_machines 1 -m
hf_otselect.cli select --config ...`` (or ``torchrun --standalone --nproc_per_node 2 -m
hf_otselect.cli select ...``). The CLI holds no logic of its own: it parses, then calls the library.
"""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-otselect", description="Optimal-transport data selection for Hugging Face datasets.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    sel = sub.add_parser("select", help="run a selection job from a YAML config")
    sel.add_argument("--config", help="YAML job file (see configs/)")
    sel.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. k=200 params.eps=0.05")

    push = sub.add_parser("push", help="push a finished selection and its card to the Hub")
    push.add_argument("output_dir")
    push.add_argument("--repo-id", required=True)
    push.add_argument("--public", action="store_true", help="create the repository as public (default private)")
    push.add_argument("--split", default="train")
    push.add_argument("--license", default="unknown", help="the card's license field (the pool's licence terms carry over)")

    rep = sub.add_parser("report", help="write report.html for a finished selection")
    rep.add_argument("output_dir")
    rep.add_argument("--columns", nargs="*", default=None, help="categorical columns to break the selection down by")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a bad argument or config, with no traceback)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "select":
            from .config import load_config
            from .job import run_job

            out = run_job(load_config(args.config, args.overrides))
            if out is not None:
                print(out)
        elif args.command == "push":
            from .hub import push

            print(push(args.output_dir, args.repo_id, private=not args.public, split=args.split, license=args.license))
        elif args.command == "report":
            from .report import write_report

            print(write_report(args.output_dir, columns=args.columns))
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, ImportError) as err:
        # One line, no traceback: YAML and Hub errors carry newlines; a user's terminal wants the gist.
        print(f"hf-otselect: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
