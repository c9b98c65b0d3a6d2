"""A grid's results that outlive the machine that ran them: one small record per finished run.

A run's folder (weights, logs, checkpoint) is large and stays on the machine that made it, and
machines are lent and reset. The ledger is a folder meant to be committed: per finished run, a
JSON record of what a report needs (the run's ``result.json``, its learning curve, the md5 of
the data it learned from, the attribution that explained it), and the collector's record of
each dataset. ``lmencoders report`` regenerates RESULTS.md from it, and ``lmencoders
experiment`` skips the runs it holds, after their folders are gone. A record carries no path
of the machine that wrote it: paths under the working directory are kept relative.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
from pathlib import Path

from .datasets import dataset_md5
from .errors import LMEncodersError
from .files import atomic_write

__all__ = [
    "Ledger",
    "LedgerError",
    "configuration_of",
    "learning_curve",
    "relative_to_here",
    "run_record",
]

RUNS = "runs"
DATASETS = "datasets.json"
# the parts of a result.json a report reads; a record without them cannot be reported
REQUIRED = ("config", "run", "evaluation", "dataset_trajectories", "dataset_mean_return")


class LedgerError(LMEncodersError, ValueError):
    """A ledger file that cannot be read as a record (named, with what is wrong)."""


_ATTEMPT = re.compile(r"^(?P<base>.+-[0-9a-f]{8})(?:-(?P<attempt>\d+))?$")


def configuration_of(run_folder: str) -> tuple[str, int]:
    """A run folder's configuration name and attempt (``name``: 1, ``name-2``: 2...)."""
    match = _ATTEMPT.match(run_folder)
    return (match["base"], int(match["attempt"] or 1)) if match else (run_folder, 1)


def learning_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, return) of every evaluation d3rlpy logged for the run (``environment.csv``)."""
    path = run_dir / "environment.csv"
    if not path.is_file():
        return []
    with open(path) as f:
        return [(int(row[1]), float(row[2])) for row in csv.reader(f) if len(row) >= 3]


def _relative_path(path: str) -> str:
    return path.removeprefix(str(Path.cwd().resolve()) + os.sep)


def relative_to_here(command: str) -> str:
    """A command with the paths under the working directory (the repository, when run there)
    made relative, so that records and reports name no machine's folders."""
    return " ".join(shlex.quote(_relative_path(word)) for word in shlex.split(command))


def run_record(run_dir: Path, result: dict) -> dict:
    """The ledger's record of a finished run: its result with the learning curve and the
    dataset's md5 (from the run when it recorded one, else from the file here), without the
    path of its weights."""
    record = {k: v for k, v in result.items() if k != "model"}
    record["config"] = dict(result["config"])
    record["config"]["dataset"] = _relative_path(str(record["config"]["dataset"]))
    if record.get("command"):
        record["command"] = relative_to_here(record["command"])
    curve = learning_curve(run_dir)
    record["curve"] = [list(point) for point in curve] or record.get("curve", [])
    if not record.get("dataset_md5"):
        record["dataset_md5"] = dataset_md5(result["config"]["dataset"])
    return record


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LedgerError(f"{path}: unreadable ledger file ({error})") from error


def _write_json(path: Path, value: object) -> None:
    text = json.dumps(value, indent=1, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


class Ledger:
    """The records in ``folder``: ``runs/<configuration>.json`` and ``datasets.json``."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def _path(self, run: str) -> Path:
        return self.folder / RUNS / f"{configuration_of(run)[0]}.json"

    def get(self, run: str) -> dict | None:
        """The record of a run's configuration (any attempt's folder name), if held."""
        path = self._path(run)
        return self._checked(path) if path.is_file() else None

    def records(self) -> list[dict]:
        """Every record, in the order of their configurations' names."""
        return [self._checked(p) for p in sorted((self.folder / RUNS).glob("*.json"))]

    def add(self, record: dict) -> None:
        """Keep ``record`` (the newest attempt of its configuration replaces an older one's);
        an attribution the held record had for the same attempt is kept."""
        path = self._path(record["run"])
        held = self.get(record["run"])
        if held and held.get("dataset_md5") not in (None, record.get("dataset_md5")):
            # the same settings on a dataset file made again: the earlier draw's run stays
            path.rename(path.with_name(f"{path.stem}@{held['dataset_md5']}.json"))
            held = None
        if held and configuration_of(held["run"])[1] > configuration_of(record["run"])[1]:
            return
        if held and held["run"] == record["run"] and "explanation" in held:
            record.setdefault("explanation", held["explanation"])
        if record != held:
            _write_json(path, record)

    def datasets(self) -> dict[str, dict]:
        """Dataset file name -> what the collector recorded of it (with its md5)."""
        path = self.folder / DATASETS
        held = _read_json(path) if path.is_file() else {}
        if not isinstance(held, dict):
            raise LedgerError(f"{path}: expected an object of dataset records")
        return held

    def dataset(self, name: str, md5: str | None = None) -> dict | None:
        """The record of dataset file ``name`` (of the draw with ``md5``, where given)."""
        held = self.datasets()
        for entry in (held.get(name), held.get(f"{name}@{md5}")):
            if entry is not None and md5 in (None, entry.get("md5")):
                return entry
        return None

    def add_datasets(self, entries: dict[str, dict]) -> None:
        """Keep each file's record; one it replaces (the file was made again, another md5)
        stays under ``name@md5``, for the runs that learned from it."""
        held = self.datasets()
        merged = dict(held)
        for name, entry in entries.items():
            before = held.get(name)
            if before is not None and before.get("md5") != entry.get("md5"):
                merged[f"{name}@{before['md5']}"] = before
            merged[name] = entry
        if merged != held:
            _write_json(self.folder / DATASETS, merged)

    @staticmethod
    def _checked(path: Path) -> dict:
        record = _read_json(path)
        if not isinstance(record, dict):
            raise LedgerError(f"{path}: expected a run record (an object)")
        missing = [key for key in REQUIRED if key not in record]
        if missing:
            raise LedgerError(f"{path}: the run record has no {', '.join(missing)}")
        return record
