"""On-disk cache of analysis reports, so reopening the same models is instant.

Reports live in one SQLite file under the user cache folder (``$MERGESCOPE_CACHE_DIR``, else
``$XDG_CACHE_HOME/mergescope``, else ``~/.cache/mergescope``), keyed by the checkpoints' fingerprints
(every weight file's identity and the hash of its first bytes, :meth:`Checkpoint.fingerprint`), the model
names and the density. Rewriting a checkpoint changes its fingerprint, so a stale report is never served.

The cache is an optimisation, never a reason to fail: a file that is not a database (corrupted, truncated)
is replaced by a fresh one, a table or a report written by another version is ignored, an entry that does
not parse or has not the report's shape is a miss, and a cache that cannot be written is skipped. A miss
means the analysis is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

from mergescope.checkpoints import Checkpoint

#: bump when the statistics or the report shape change, to invalidate every cached report
CACHE_VERSION = "analysis-2"  # 2: embeddings and heads compared by token string across vocabularies
#: the table holding this version's reports; other versions' tables in the same file are left alone
TABLE = "reports_" + CACHE_VERSION.replace("-", "_")
#: a cached report's keys and the JSON type of each (``mergescope.analysis/1``)
REPORT_SHAPE = {"schema": str, "density": (int, float), "base": dict, "models": list, "tensors": list,
                "groups": list, "total": dict, "warnings": list}


def cache_dir() -> Path:
    explicit = os.environ.get("MERGESCOPE_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "mergescope"


def cache_key(base: Checkpoint, models: list[Checkpoint], names: list[str], density: float) -> str:
    # the tokenizers decide which rows are compared (analysis.vocabulary_rows), so they are part of the key
    parts = [CACHE_VERSION, base.fingerprint, str(base.tokenizer_fingerprint), base.name, repr(float(density))]
    parts += [f"{name}|{m.source}|{m.fingerprint}|{m.tokenizer_fingerprint}" for name, m in zip(names, models)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


class AnalysisCache:
    def __init__(self, path: Path | None = None):
        self.path = path or cache_dir() / "analysis.sqlite"

    def _run(self, action: Callable[[sqlite3.Connection], object]) -> object:
        """``action`` on a connection (committed); a file that is not a database is replaced and tried once more;
        any other failure (locked, read-only, no space) raises for the caller to skip the cache."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for attempt in (1, 2):
            try:
                with closing(sqlite3.connect(self.path, timeout=5)) as connection, connection:
                    connection.execute(
                        f"CREATE TABLE IF NOT EXISTS {TABLE} (key TEXT PRIMARY KEY, created REAL, report TEXT)"
                    )
                    return action(connection)
            except sqlite3.OperationalError:
                raise
            except sqlite3.DatabaseError:  # corrupted or truncated: not a database any more
                if attempt == 2:
                    raise
                self.path.unlink(missing_ok=True)
        return None  # pragma: no cover - the loop returns or raises

    def get(self, key: str) -> dict | None:
        try:
            row = self._run(lambda c: c.execute(f"SELECT report FROM {TABLE} WHERE key = ?", (key,)).fetchone())
        except (sqlite3.Error, OSError):
            return None
        if row is None or not isinstance(row[0], str):
            return None
        try:
            report = json.loads(row[0])
        except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
            return None
        return report if _has_report_shape(report) else None

    def put(self, key: str, report: dict) -> None:
        row = (key, time.time(), json.dumps(report))
        try:
            self._run(lambda c: c.execute(f"INSERT OR REPLACE INTO {TABLE} VALUES (?, ?, ?)", row))
        except (sqlite3.Error, OSError):
            pass


def _has_report_shape(value: object) -> bool:
    return isinstance(value, dict) and all(isinstance(value.get(k), kind) for k, kind in REPORT_SHAPE.items())
