"""Runs that survive being killed: a checkpoint at each epoch's end, and a rerun goes on from it.

A grid on a CPU runs for days, in sessions that end when they end; a frozen-LM run killed at
90% must not start again from step 0. After every epoch (every evaluation) the run folder gets
``checkpoint.pt``: each module's and optimiser's state, the gradient step, the random
generators' states and the evaluator's progress (the curve itself is in d3rlpy's logs). A
rerun of the same settings finds the unfinished folder and continues it: same batches, same
noise, so the result is the uninterrupted run's bit for bit (tested). The file is read with
``weights_only=True``, like ``model.pt``, and removed when the run has its result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import random
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from d3rlpy.logging import FileAdapter, FileAdapterFactory, LoggerAdapter, LoggerAdapterFactory

from .files import atomic_write, hold_file
from .saving import load_states, module_states

__all__ = [
    "CHECKPOINT",
    "Checkpoint",
    "held",
    "save_checkpoint",
    "load_checkpoint",
    "keep_logs_until",
    "ContinuedLogs",
    "AppendingFileAdapterFactory",
]

CHECKPOINT = "checkpoint.pt"
LOCK = "run.lock"  # empty; what is held is the open file


@dataclasses.dataclass
class Checkpoint:
    """Where a run stood at the end of an epoch."""

    epoch: int  # epochs done
    grad_step: int
    train_seconds: float  # spent so far, over every attempt
    evaluator: dict[str, Any]  # evaluations done, their seconds, the last one
    modules: dict[str, Any]  # every module's and optimiser's state dict
    rng: dict[str, Any]
    path: Path

    def restore(self, algo: Any) -> None:
        """Put ``algo`` (built, same settings) and the random generators where the run was."""
        why = "; it was written by other code or settings (delete it, and the run starts afresh)"
        load_states(algo, self.modules, self.path, why)
        algo._grad_step = self.grad_step  # d3rlpy 2.8 keeps the update count here
        _set_rng(self.rng)


def save_checkpoint(
    algo: Any, folder: Path, *, epoch: int, train_seconds: float, evaluator: dict[str, Any]
) -> None:
    """Write ``folder/checkpoint.pt`` atomically (a kill while writing keeps the last one)."""
    state = {
        "modules": module_states(algo),
        "rng": _rng_state(),
        "run": json.dumps(
            {
                "epoch": epoch,
                "grad_step": algo.grad_step,
                "train_seconds": train_seconds,
                "evaluator": evaluator,
            }
        ),
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(folder / CHECKPOINT, lambda f: f.write(buffer.getvalue()))


def load_checkpoint(folder: Path) -> Checkpoint | None:
    """The folder's checkpoint; ``None`` (with a warning naming the file) where it is missing
    or unreadable, so that the run starts afresh in a new folder and this one stays as it is."""
    path = folder / CHECKPOINT
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        run = json.loads(state["run"])
        return Checkpoint(
            epoch=int(run["epoch"]),
            grad_step=int(run["grad_step"]),
            train_seconds=float(run["train_seconds"]),
            evaluator=run["evaluator"],
            modules=state["modules"],
            rng=state["rng"],
            path=path,
        )
    except Exception as exc:  # a damaged file: say so, and lose nothing by not using it
        message = f"{path}: not a readable checkpoint ({exc}); the run starts afresh"
        warnings.warn(message, stacklevel=2)
        return None


@contextlib.contextmanager
def held(folder: Path, *, look_only: bool = False) -> Iterator[bool]:
    """Hold ``folder`` for one process while the block runs; yields False where another
    process holds it (two runs of the same settings at once must not continue one folder).
    The operating system drops the hold when its process dies, so a killed run's folder is
    free again. Where ``fcntl`` is missing (Windows), every folder is free. ``look_only``:
    write nothing (a folder no process ever held is free)."""
    if look_only and not (folder / LOCK).exists():
        yield True
        return
    with hold_file(folder / LOCK, wait=False) as free:
        yield free


def _rng_state() -> dict[str, Any]:
    name, keys, position, has_gauss, gauss = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": json.dumps([name, keys.tolist(), position, has_gauss, gauss]),
        "python": json.dumps([version, list(internal), gauss_next]),
    }


def _set_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, position, has_gauss, gauss = json.loads(state["numpy"])
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss_next))


def keep_logs_until(folder: Path, epoch: int) -> None:
    """Drop the rows of d3rlpy's CSV logs after ``epoch`` (a kill between an epoch's log rows
    and its checkpoint leaves rows that the continued run writes again)."""
    for csv in folder.glob("*.csv"):
        lines = csv.read_text().splitlines(keepends=True)
        kept = [line for line in lines if not _epoch_of(line) > epoch]
        if kept != lines:
            atomic_write(csv, lambda f, kept=kept: f.write("".join(kept).encode()))


def _epoch_of(line: str) -> int:
    """A log row's epoch (its first field); -1 for a header."""
    first = line.split(",", 1)[0]
    return int(first) if first.isdigit() else -1


class ContinuedLogs(LoggerAdapterFactory):
    """d3rlpy's loggers for a continued run: d3rlpy counts epochs and steps from the start of
    ``fit``, so these add the ones done before."""

    def __init__(self, factories: list[LoggerAdapterFactory], epochs: int, steps: int) -> None:
        self.factories, self.epochs, self.steps = factories, epochs, steps

    def create(self, algo: Any, experiment_name: str, n_steps_per_epoch: int) -> LoggerAdapter:
        adapters = [f.create(algo, experiment_name, n_steps_per_epoch) for f in self.factories]
        return _Continued(adapters, self.epochs, self.steps)


class AppendingFileAdapterFactory(FileAdapterFactory):
    """d3rlpy's CSV logs, continued: rows are appended (as d3rlpy does) and the gradient logs'
    headers, written by the run being continued, are not written again (d3rlpy would empty
    those files)."""

    def create(self, algo: Any, experiment_name: str, n_steps_per_epoch: int) -> FileAdapter:
        adapter = FileAdapter(algo, str(Path(self._root_dir) / experiment_name))
        adapter._is_model_watched = True  # d3rlpy 2.8: "headers written"
        return adapter


class _Continued:
    """Every adapter, told the run's epoch and step rather than the continued fit's."""

    def __init__(self, adapters: list[LoggerAdapter], epochs: int, steps: int) -> None:
        self.adapters, self.epochs, self.steps = adapters, epochs, steps

    def write_params(self, params: dict[str, Any]) -> None:
        for adapter in self.adapters:
            adapter.write_params(params)

    def before_write_metric(self, epoch: int, step: int) -> None:
        for adapter in self.adapters:
            adapter.before_write_metric(epoch + self.epochs, step + self.steps)

    def write_metric(self, epoch: int, step: int, name: str, value: float) -> None:
        for adapter in self.adapters:
            adapter.write_metric(epoch + self.epochs, step + self.steps, name, value)

    def after_write_metric(self, epoch: int, step: int) -> None:
        for adapter in self.adapters:
            adapter.after_write_metric(epoch + self.epochs, step + self.steps)

    def save_model(self, epoch: int, algo: Any) -> None:
        for adapter in self.adapters:
            adapter.save_model(epoch + self.epochs, algo)

    def close(self) -> None:
        for adapter in self.adapters:
            adapter.close()

    def watch_model(self, epoch: int, step: int) -> None:
        for adapter in self.adapters:
            adapter.watch_model(epoch + self.epochs, step + self.steps)
