"""Judges' verdicts kept on disk, so an interrupted relabel resumes and a repeated one is free.

A verdict is stored under the sha256 of the judge's identity (everything that decides its
answer: model, weights, endpoint, answer words...) and the text it read. SQLite commits each
batch atomically: a process killed mid-run loses at most the batch in flight.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

__all__ = ["Verdict", "VerdictCache", "verdict_key"]


@dataclasses.dataclass(frozen=True)
class Verdict:
    """A judge's reply, and the probability of each answer word where the judge scores them."""

    answer: str
    probabilities: Mapping[str, float] | None = None


def verdict_key(identity: str, text: str) -> str:
    return hashlib.sha256(identity.encode() + b"\0" + text.encode()).hexdigest()


class VerdictCache:
    """``key -> Verdict`` in one SQLite file. A file that is not a readable cache is moved
    aside (never deleted) and a new one started."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = self._open()
        except sqlite3.DatabaseError as exc:
            aside = self.path.with_name(f"{self.path.name}.broken-{int(time.time())}")
            self.path.rename(aside)
            warnings.warn(
                f"{self.path}: not a verdict cache ({exc}); kept as {aside.name}, starting anew",
                stacklevel=2,
            )
            self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path)
        try:
            db.execute(
                "CREATE TABLE IF NOT EXISTS verdicts "
                "(key TEXT PRIMARY KEY, answer TEXT NOT NULL, probabilities TEXT)"
            )
            db.execute("SELECT count(*) FROM verdicts").fetchone()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def get(self, keys: Iterable[str]) -> dict[str, Verdict]:
        """The stored verdicts among ``keys``."""
        keys = list(keys)
        found: dict[str, Verdict] = {}
        for start in range(0, len(keys), 500):  # SQLite's bound on parameters per query
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT key, answer, probabilities FROM verdicts WHERE key IN ({marks})", chunk
            )
            for key, answer, probabilities in rows:
                found[key] = Verdict(answer, json.loads(probabilities) if probabilities else None)
        return found

    def put(self, verdicts: Mapping[str, Verdict]) -> None:
        """Store ``verdicts`` in one transaction."""
        rows = [
            (key, v.answer, json.dumps(dict(v.probabilities)) if v.probabilities else None)
            for key, v in verdicts.items()
        ]
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?)", rows)

    def __len__(self) -> int:
        return self._db.execute("SELECT count(*) FROM verdicts").fetchone()[0]

    def close(self) -> None:
        self._db.close()
