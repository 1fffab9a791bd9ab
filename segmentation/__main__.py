"""``python -m segmentation train|predict ...``: the ``cytofuse seg`` actions on their own."""
import sys

from .cli import run_standalone

raise SystemExit(run_standalone(sys.argv[1:]))
