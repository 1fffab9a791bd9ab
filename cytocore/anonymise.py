"""``--anonymise``: outputs keyed by a salted hash of the image id, the key to names kept apart.

Slide and image file names often carry a patient or case number. With ``--anonymise`` every output
(file names, ``image_id`` columns, COCO ``file_name``, GeoJSON properties, ``run.json``) uses
``anon-<16 hex>`` = the first 64 bits of SHA-256(salt ‖ image id) instead; the salt is 32 random
bytes made on first use. The mapping (salt, and each id with its file name and key) is written to a
separate CSV the user keeps, by default *beside* the output folder (``<out>.anonymise-key.csv``), never
inside it, so the output folder can be shared as it is. A second run with the same key file reuses
its salt, so keys stay stable and an interrupted run resumes.

Without the salt the keys cannot be reversed by hashing a list of likely case numbers.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import secrets
from pathlib import Path
from typing import Optional, Union

from .atomic import write_text
from .errors import DataError

PathLike = Union[str, Path]
PREFIX = "anon-"
SALT_ROW = "#salt"


def default_key_path(out_dir: PathLike) -> Path:
    """``<out>.anonymise-key.csv`` next to the output folder (not in it)."""
    out = Path(out_dir).resolve()
    return out.parent / f"{out.name}.anonymise-key.csv"


class Anonymiser:
    """Salted-hash keys for image ids, and the key file that maps them back."""

    def __init__(self, key_path: PathLike, salt: Optional[bytes] = None) -> None:
        self.key_path = Path(key_path)
        self.mapping: dict[str, tuple[str, str]] = {}  # image id -> (file name, key)
        if salt is None:
            salt = self._read_existing() or secrets.token_bytes(32)
        self.salt = salt

    def _read_existing(self) -> Optional[bytes]:
        if not self.key_path.is_file():
            return None
        salt = None
        try:
            with open(self.key_path, newline="", encoding="utf-8") as fh:
                for row in csv.reader(fh):
                    if len(row) >= 2 and row[0] == SALT_ROW:
                        salt = bytes.fromhex(row[1])
                    elif len(row) == 3 and row[0] not in ("image_id", SALT_ROW):
                        self.mapping[row[0]] = (row[1], row[2])
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise DataError(f"{self.key_path}: not a CytoFuse anonymisation key file ({exc})") from None
        if salt is None:
            raise DataError(f"{self.key_path}: no {SALT_ROW} row; not a CytoFuse anonymisation key file")
        return salt

    def key(self, image_id: str, file_name: str = "") -> str:
        """The anonymous id of ``image_id`` (recorded for the key file)."""
        digest = hashlib.sha256(self.salt + str(image_id).encode("utf-8")).hexdigest()[:16]
        key = PREFIX + digest
        self.mapping[str(image_id)] = (file_name or self.mapping.get(str(image_id), ("", ""))[0], key)
        return key

    def save(self) -> Path:
        """Write the key file (atomically): the salt, then ``image_id,file,key`` rows."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow([SALT_ROW, self.salt.hex()])
        writer.writerow(["image_id", "file", "key"])
        for image_id in sorted(self.mapping):
            name, key = self.mapping[image_id]
            writer.writerow([image_id, name, key])
        write_text(self.key_path, buf.getvalue())
        os.chmod(self.key_path, 0o600)  # it holds the salt: readable by its owner only
        return self.key_path
