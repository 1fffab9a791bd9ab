"""Content hashes: of files (checkpoints, for ``run.json``) and of settings (resume fingerprints).

A run folder is reused only when the fingerprint of what produced it (checkpoint hashes, resolved
settings) is the one of the current command, so every resume check in the project hashes the same
way here instead of each hand-writing ``json.dumps`` + ``sha256``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Union

PathLike = Union[str, Path]


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (checkpoints can be hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(value: Any, length: int = 16) -> str:
    """A short hex digest of a JSON-able value: keys sorted, anything else turned into text.

    Equal settings give equal fingerprints whatever the dict order; ``length`` hex digits (16 = 64
    bits) are plenty to tell the runs of one folder apart.
    """
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]
