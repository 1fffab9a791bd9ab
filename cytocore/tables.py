"""Reading CSV tables so that every bad cell can be reported with its file and line.

Shared by the data-set readers (``labels.csv``, ``metadata.csv``), ``splits.csv``, the predictions
reader and the classifier's box files; it lives apart from any one reader so none of them has to
import another to read a table.
"""
from __future__ import annotations

import csv
import re
import warnings
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import pandas as pd

from .errors import DataError

PathLike = Union[str, Path]


def read_csv_table(path: PathLike, required: Sequence[str] = (), text: Sequence[str] = ("image_id",)) -> pd.DataFrame:
    """Read a CSV as strings indexed by 1-based line number, blank lines dropped.

    Everything is read as text so that a stray ``abc`` or an empty cell can be reported with its line
    instead of silently turning a whole column into floats or NaN; callers convert what they need.
    Column names are stripped; ``required`` names are matched case-insensitively and renamed to the
    given spelling. Leading blanks are skipped by the parser; trailing ones are stripped only from the
    ``text`` columns (numbers parse with them, and stripping 100 000 cells per column is not free).
    A file that cannot be parsed at all raises :class:`DataError` in one line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with warnings.catch_warnings():
            # pandas only warns (and drops cells) when the first data row is longer than the header.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            df = pd.read_csv(path, dtype=str, keep_default_na=False, skip_blank_lines=False, index_col=False,
                             skipinitialspace=True, encoding="utf-8-sig")
    except pd.errors.ParserWarning:
        raise DataError(f"{path}:{_first_long_line(path)}: row has more fields than the header") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: file is empty (expected a header line)") from None
    except pd.errors.ParserError as exc:
        ragged = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(exc))
        if ragged:
            want, line, got = ragged.groups()
            raise DataError(f"{path}:{line}: row has {got} fields but the header has {want}") from None
        raise DataError(f"{path}: cannot parse CSV ({_one_line(exc)})") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    header = _header(path)
    repeated = sorted({c for c in header if header.count(c) > 1})
    if repeated:
        raise DataError(f"{path}:1: column {repeated[0]} appears more than once in the header")
    df.columns = [str(c).strip() for c in df.columns]
    lower = {c.lower(): c for c in df.columns}
    missing = [name for name in required if name.lower() not in lower]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (header has: {', '.join(df.columns)})")
    df = df.rename(columns={lower[name.lower()]: name for name in required})
    df.index = pd.RangeIndex(2, len(df) + 2, name="line")
    for col in text:
        if col in df.columns:
            df[col] = df[col].str.strip()
    blank = (df == "").all(axis=1)
    return df.loc[~blank]


def _header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        return [c.strip() for c in next(csv.reader(fh), [])]


def _first_long_line(path: Path) -> int:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = csv.reader(fh)
        width = len(next(rows, []))
        return next((rows.line_num for row in rows if len(row) > width), 2)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def to_numbers(column: pd.Series) -> np.ndarray:
    """Column of strings to float64; empty and non-numeric cells become NaN."""
    return pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
