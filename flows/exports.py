"""Tables from the provenance database to files, for the ``features`` and ``volumes`` commands.

Formats: Parquet (types kept: floats stay float64, NULL stays null) and CSV (comma
separated, a header row, empty cells for NULL). The format is ``fmt`` or, when that is
``None``, the file's suffix (``.parquet``/``.pq``, ``.csv``). Files are written atomically.
Column names: as :mod:`db.queries` returns them (wide features: ``<class>_<feature>`` in
lower case, the same names as the SQL view ``radiomics_wide``).
"""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd

from tasks.io import write_bytes_atomic

FORMATS = ("parquet", "csv")
_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}


def table_format(path: str | Path, fmt: str | None = None) -> str:
    """``fmt`` if given, else the format named by ``path``'s suffix.

    Raises
    ------
    ValueError
        An unknown ``fmt``, or no ``fmt`` and a suffix that names no format.
    """
    if fmt is not None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown table format {fmt!r}; choose one of {', '.join(FORMATS)}")
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix not in _SUFFIXES:
        raise ValueError(
            f"cannot tell the format of {Path(path).name!r} from its suffix: name it "
            f"{', '.join(_SUFFIXES)} or pass --format {'|'.join(FORMATS)}"
        )
    return _SUFFIXES[suffix]


def write_table(frame: pd.DataFrame, path: str | Path, *, fmt: str | None = None) -> str:
    """Write ``frame`` (without its index) to ``path``; return the file's sha256."""
    buffer = io.BytesIO()
    if table_format(path, fmt) == "parquet":
        frame.to_parquet(buffer, index=False)
    else:
        frame.to_csv(buffer, index=False)
    return write_bytes_atomic(path, buffer.getvalue())
