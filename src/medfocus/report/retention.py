"""The causal filter's retention table as the report shows it: read, checked, matched to the run.

The table is the one ``medfocus bench build`` / ``bench retention`` write (``retention.csv``, columns
:data:`REQUIRED_COLUMNS` and more, :func:`medfocus.bench.build.retention_row`). The report prints it
under "Causal filter: retention", so a table that is not one (a benchmark split, a damaged file), or one
that contradicts itself, must never appear there as if it were:

* unreadable (not UTF-8, bad quoting, empty): one :class:`~medfocus.errors.DataError` naming the file;
* a required column missing: an error naming the columns;
* counts that are not non-negative integers, ``errors + failed_correct + failed_flip + failed_background +
  kept != n``, or a ``retention_pct`` that is not ``100 * kept / n`` (to the bench's one decimal): an
  error naming the row and both numbers. The table is **refused, not repaired**: a row whose percentage
  contradicts its own counts says that one of them is wrong, and nothing tells which;
* rows of models / datasets the run does not hold (:func:`rows_of_run`): left out of the report's table
  and named in a note above it; a table with no row of the run is an error.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from medfocus.errors import DataError

__all__ = ["REQUIRED_COLUMNS", "COUNT_COLUMNS", "read_retention", "check_retention", "rows_of_run"]

#: Count columns; ``errors + failed_* + kept == n`` (each positive sample is charged to the first gate it fails).
COUNT_COLUMNS: tuple[str, ...] = ("n", "errors", "failed_correct", "failed_flip", "failed_background", "kept")
#: Columns the report needs (the bench's table has more: ``unparseable_<gate>``, ``negatives``...).
REQUIRED_COLUMNS: tuple[str, ...] = ("model", "dataset", "mode", "editor", *COUNT_COLUMNS, "retention_pct")


def read_retention(path: str | Path) -> pd.DataFrame:
    """Read and check a retention table from ``.csv``, ``.json`` (a list of rows) or ``.jsonl``.

    Raises:
        DataError: a missing file, another suffix, an unreadable file (undecodable bytes, bad quoting,
            empty) -- one line naming the file, never a parser traceback -- or a table
            :func:`check_retention` refuses.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"retention table {p} does not exist")
    if p.suffix not in (".csv", ".json", ".jsonl"):
        raise DataError(f"retention table {p}: expected .csv, .json or .jsonl")
    try:
        if p.suffix == ".csv":
            df = pd.read_csv(p, encoding="utf-8")
        else:
            df = pd.read_json(p, lines=p.suffix == ".jsonl", encoding="utf-8")
    except (UnicodeDecodeError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError, OSError) as exc:
        msg = " ".join(str(exc).split())[:200]
        raise DataError(f"{p}: cannot read the retention table ({type(exc).__name__}: {msg})") from None
    if not isinstance(df, pd.DataFrame):
        raise DataError(f"{p}: a retention table is a list of rows, got {type(df).__name__}")
    return check_retention(df, source=str(p))


def check_retention(table: pd.DataFrame | Sequence[Mapping[str, Any]], *, source: str = "retention table") -> pd.DataFrame:
    """The retention table as a DataFrame, its counts as integers, after checking it (module docstring).

    Args:
        table: rows (dicts) or a DataFrame, as :func:`medfocus.bench.build.retention_table` returns.
        source: how messages name it (the file).
    Raises:
        DataError: no rows, a required column missing (named), a count that is not a non-negative integer,
            counts that do not add up to ``n``, or ``retention_pct`` inconsistent with ``kept / n`` (naming
            the row -- its CSV line -- and both values).
    """
    df = table.copy() if isinstance(table, pd.DataFrame) else pd.DataFrame(list(table))
    if len(df) == 0:
        raise DataError(f"{source}: the retention table has no rows")
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{source}: not a retention table: column(s) {missing} missing (has {[str(c) for c in df.columns][:12]}); "
                        f"expected the table `medfocus bench build` writes (retention.csv: {', '.join(REQUIRED_COLUMNS)}, ...)")
    df = df.reset_index(drop=True)

    def where(i: int) -> str:
        r = df.iloc[i]
        return f"{source} row {i + 1} (CSV line {i + 2}; {r['model']} / {r['dataset']} / {r['mode']} / {r['editor']})"

    for c in COUNT_COLUMNS:
        vals = pd.to_numeric(df[c], errors="coerce")
        for i, (raw, v) in enumerate(zip(df[c], vals)):
            if not (math.isfinite(v) and v >= 0 and float(v).is_integer()):
                raise DataError(f"{where(i)}: {c!r} must be a count (a non-negative integer), got {raw!r}")
        df[c] = vals.astype(int)
    pct = pd.to_numeric(df["retention_pct"], errors="coerce")
    for i in range(len(df)):
        r = df.iloc[i]
        parts = int(r["errors"]) + int(r["failed_correct"]) + int(r["failed_flip"]) + int(r["failed_background"]) + int(r["kept"])
        if parts != int(r["n"]):
            raise DataError(f"{where(i)}: errors + failed_correct + failed_flip + failed_background + kept = {parts}, "
                            f"but n = {int(r['n'])} (every positive sample is charged to exactly one of them)")
        n, kept = int(r["n"]), int(r["kept"])
        want = 100.0 * kept / n if n else 0.0
        # the bench rounds to one decimal: anything further off contradicts the row's own counts
        if not math.isfinite(pct[i]) or abs(float(pct[i]) - want) > 0.05 + 1e-9:
            raw = df["retention_pct"].iloc[i]
            raise DataError(f"{where(i)}: retention_pct {raw.item() if hasattr(raw, 'item') else raw!r} contradicts its counts: kept / n = "
                            f"{kept} / {n} = {want:.1f}%. The table is refused, not repaired: one of the two is wrong "
                            "(rebuild it with `medfocus bench retention`)")
    df["retention_pct"] = pct.astype(float)
    return df


def rows_of_run(table: pd.DataFrame, run: Sequence[tuple[str, str]], *, source: str = "retention table"
                ) -> tuple[pd.DataFrame, str | None]:
    """The rows of ``table`` whose ``(model, dataset)`` is in ``run`` and a note naming the others.

    A run without records (``run`` empty: the filter may have kept nothing) keeps every row.

    Returns:
        ``(rows, note)``; ``note`` is ``None`` when no row was left out.
    Raises:
        DataError: ``run`` is not empty and no row belongs to it (the table is of another run).
    """
    if not run:
        return table, None
    pairs = {(str(m), str(d)) for m, d in run}
    mine = [(str(m), str(d)) in pairs for m, d in zip(table["model"], table["dataset"])]
    kept = table[mine]
    others = table[[not x for x in mine]]
    if len(kept) == 0:
        raise DataError(f"{source}: no row of this run's models / datasets ({', '.join(f'{m}/{d}' for m, d in sorted(pairs))}); "
                        f"the table holds {', '.join(sorted({f'{m}/{d}' for m, d in zip(table['model'], table['dataset'])}))} "
                        "-- the retention table of another run?")
    note = None
    if len(others):
        names = sorted({f"{m}/{d}" for m, d in zip(others["model"], others["dataset"])})
        note = (f"{len(others)} row(s) of the retention table ({source}) are of models / datasets not in this run and "
                f"are left out: {', '.join(names)}")
    return kept, note
