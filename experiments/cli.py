"""The ``cytofuse`` command: one entry point whose subcommands each stage registers.

Each stage's ``cli.py`` has ``register(subparsers)`` and imports its heavy modules (MindSpore,
mindcv) only inside the handler, so ``cytofuse --help`` and the data commands stay fast. This module
lives in ``experiments`` because it is the one package allowed to import every stage.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

import classification.cli
import cytocore.cli
import cytosynth.cli
import fusion.cli
import segmentation.cli
from cytocore.errors import CytoFuseError

from . import commands, commands_compare, commands_export, commands_research, fuse_fit

#: Every module that adds subcommands, in the order ``--help`` lists them. Each has ``register``.
STAGE_CLIS = (
    cytosynth.cli,
    cytocore.cli,
    segmentation.cli,
    classification.cli,
    fusion.cli,
    commands,
    fuse_fit,
    commands_compare,
    commands_research,
    commands_export,
)


EXIT_CODES = """exit status:
  0  all done
  3  some inputs failed (reported one per line; the rest finished, run the same command again to retry them)
  2  usage or configuration error (bad option, config, checkpoint or data set), nothing run
  1  anything unexpected (a bug: please report the traceback)"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cytofuse",
        description="Find and classify lung-cancer cells in cytology images (U-Net + EfficientNet, MindSpore).",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logging and MindSpore's own log")
    parser.add_argument("--version", action="version", version=f"cytofuse {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in STAGE_CLIS:
        module.register(sub)
    return parser


def package_version() -> str:
    """The installed distribution's version (setup.cfg), or "unknown" when run from a bare checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cytofuse")
    except PackageNotFoundError:
        return "unknown (not installed: run `make install`)"


def run(argv: Optional[Sequence[str]] = None) -> int:
    """Parse and run; return the exit code. Errors the user can fix become one line, not a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for --workers, which relaunches the command
    _serve_if_scheduler()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s: %(message)s" if not args.verbose else "%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    if args.verbose:
        os.environ.setdefault("CYTOFUSE_MS_LOG", "1")
    from cytocore import runtime

    # before any command imports MindSpore: config checks import the U-Net module (and MindSpore with
    # it) ahead of runtime.setup(), and MindSpore fixes its log level at import, so compile warnings
    # ("compiled again", "ClearIsolatedNodes") reached users' terminals from the second stage on
    runtime.mindspore_env()
    try:
        return int(args.handler(args) or 0)
    except CytoFuseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished outputs are kept; run the same command again to continue", file=sys.stderr)
        return 130


def _serve_if_scheduler() -> None:
    """msrun's scheduler process runs this same command: it joins the job at once, before any data is
    read, and MindSpore ends the process when the workers are done."""
    from cytocore import distributed

    if distributed.is_scheduler():
        from cytocore import runtime

        runtime.setup()


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console-script entry point.

    Ends with ``os._exit`` after flushing: MindSpore's cells raise hundreds of ``Cell.__del__``
    AttributeErrors during interpreter teardown, which users must not see. Every output file is
    already written atomically and closed by then, so skipping teardown loses nothing. An msrun worker
    is the exception: MindSpore signs it off from the job during a normal exit (the noise filter of
    :mod:`cytocore.runtime` hides the destructor errors).
    """
    try:
        code = run(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        code = exc.code if isinstance(exc.code, int) else 2
    except Exception:  # noqa: BLE001 - a bug: show it, exit 1, and still skip MindSpore's teardown noise
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    from cytocore import distributed

    if distributed.joined():  # an msrun worker: a normal exit signs it off; msrun's scheduler waits for that
        sys.exit(code)
    os._exit(code)


if __name__ == "__main__":
    main()
