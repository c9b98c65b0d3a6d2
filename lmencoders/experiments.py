"""The paper's comparison as a resumable grid: datasets x methods x seeds.

Every run writes its own ``result.json`` (and d3rlpy's ``environment.csv`` learning curve); a
run whose result exists is skipped, so the grid can be worked through in parts that each fit a
session (``time_budget``), and the results merge by construction. :mod:`lmencoders.report`
turns the run folders into tables and plots.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import NamedTuple

from tqdm.auto import tqdm

from .backbone import DEFAULT_MODEL, PIECE_POOLING
from .checks import non_negative, optional_positive, positive
from .datasets import dataset_md5
from .errors import ConfigError
from .ledger import Ledger, run_record
from .options import option
from .resume import held
from .train import (
    TrainConfig,
    finished_run,
    lm_factory,
    run_name,
    run_state,
    train,
    training_data,
)

__all__ = [
    "METHODS",
    "PAPER_RESULTS",
    "ExperimentConfig",
    "grid_run_names",
    "plan_experiment",
    "run_experiment",
]

# beside the experiment's "runs": a folder per run that a lane is running (_claim)
CLAIMS = "claims"


class Method(NamedTuple):
    """The settings of a grid column (the rest are the experiment's)."""

    algo: str
    encoder: str
    tuning: str = "frozen"
    pooling: str = "mean"
    standardize_features: bool = False
    action_samples: int | None = None  # None: d3rlpy's default


# The paper's columns, and ours (LM-Segments, LM-Standardized)
METHODS: dict[str, Method] = {
    "BC": Method("bc", "vector"),
    "CQL": Method("cql", "vector"),
    "PLAS": Method("plas", "vector"),
    "BCQ": Method("bcq", "vector"),
    # BCQ with the BCQ paper's 10 sampled actions per state (d3rlpy's default, 100, makes an
    # update ~8.5x as long on CPU: benchmarks/README.md, section 12)
    "BCQ-10": Method("bcq", "vector", action_samples=10),
    "TD3+BC": Method("td3+bc", "vector"),
    "TD3+BC LM-Finetune": Method("td3+bc", "lm", "ln_embed"),
    "TD3+BC LM-No-Tune": Method("td3+bc", "lm"),
    "TD3+BC LM-Segments": Method("td3+bc", "lm", pooling="segments"),
    # LM-No-Tune with each feature standardised by its dataset mean and std
    "TD3+BC LM-Standardized": Method("td3+bc", "lm", standardize_features=True),
}

# Tarasov et al. (2022), raw returns on NeoRL v1 "low" datasets with 99 trajectories.
PAPER_RESULTS: dict[str, dict[str, float]] = {
    "Hopper": {
        "BC": 515,
        "CQL": 527,
        "PLAS": 527,
        "BCQ": 545,
        "TD3+BC": 660,
        "TD3+BC LM-Finetune": 762,
        "TD3+BC LM-No-Tune": 654,
    },
    "Walker2d": {
        "BC": 1749,
        "CQL": 2370,
        "PLAS": 42,
        "BCQ": 1407,
        "TD3+BC": 2480,
        "TD3+BC LM-Finetune": 2669,
        "TD3+BC LM-No-Tune": 2564,
    },
    "HalfCheetah": {
        "BC": 3260,
        "CQL": 3792,
        "PLAS": 3451,
        "BCQ": 3363,
        "TD3+BC": 4171,
        "TD3+BC LM-Finetune": 4084,
        "TD3+BC LM-No-Tune": 4171,
    },
    # FinRL low-99: BC/CQL/PLAS/BCQ from the paper's Table 2; it reports no LM-Finetune here.
    "FinRL": {
        "BC": 136,
        "CQL": 487,
        "PLAS": 447,
        "BCQ": 330,
        "TD3+BC": 742,
        "TD3+BC LM-No-Tune": 1043,
    },
}


@dataclasses.dataclass
class ExperimentConfig:
    """A grid of runs. Fields are the ``lmencoders experiment`` options."""

    datasets: list[str] = option(help="datasets (NeoRL .npz, d3rlpy .h5 or minari:<id>)")
    methods: list[str] = option(
        list(METHODS), "the methods to run (the paper's and ours)", choices=METHODS
    )
    seeds: list[int] = option([0, 1, 2], "random seeds")
    train_num: int | None = option(None, "keep the first trajectories (99 as NeoRL v1)")
    steps: int = option(5_000, "gradient steps per run")
    eval_every: int = option(1_000, "steps between evaluations (the learning curve)")
    eval_episodes: int = option(5, "evaluation episodes")
    curve_episodes: int | None = option(
        None, "episodes of the learning curve's evaluations before the last (default: all)"
    )
    batch_size: int = option(256, "transitions per gradient step")
    lm_batch_size: int | None = option(None, "batch for runs with a tuned LM (default: batch_size)")
    model: str = option(DEFAULT_MODEL, "Hugging Face name or local directory of the LM")
    device: str = option("cpu", "torch device")
    out_dir: str = option("experiments", "the experiment folder", flag="--out")
    time_budget: float | None = option(None, "seconds; no new run starts after it")
    dry_run: bool = option(
        False, "list each run as finished, running, to continue or to start; run none"
    )
    ledger: str | None = option(
        None, "a folder (commit it) that keeps each finished run's record; a run recorded "
        "there from the same dataset file is finished, even when its folder is gone"
    )  # fmt: skip

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ConfigError(f"unknown methods {unknown}; choose from {list(METHODS)}")
        if not self.datasets or not self.methods or not self.seeds:
            raise ConfigError("datasets, methods and seeds must each name at least one")
        self.seeds = [non_negative(s, "seeds[]") for s in self.seeds]
        self.train_num = optional_positive(self.train_num, "train_num")
        self.steps = positive(self.steps, "steps")
        self.eval_every = non_negative(self.eval_every, "eval_every")
        self.eval_episodes = positive(self.eval_episodes, "eval_episodes")
        self.batch_size = positive(self.batch_size, "batch_size")
        self.lm_batch_size = optional_positive(self.lm_batch_size, "lm_batch_size")
        if self.time_budget is not None and self.time_budget < 0:
            raise ConfigError(f"time_budget must be >= 0 seconds, got {self.time_budget!r}")
        for method in self.methods:  # every run's settings are checked before any starts
            _train_config(self, self.datasets[0], method, self.seeds[0])


def _train_config(config: ExperimentConfig, dataset: str, method: str, seed: int) -> TrainConfig:
    algo, encoder, tuning, pooling, standardize_features, action_samples = METHODS[method]
    tuned = encoder == "lm" and tuning != "frozen"
    return TrainConfig(
        dataset=dataset,
        train_num=config.train_num,
        algo=algo,
        encoder=encoder,
        tuning=tuning,
        pooling=pooling,
        standardize_features=standardize_features,
        action_samples=action_samples,
        model=config.model,
        steps=config.steps,
        eval_every=config.eval_every,
        eval_episodes=config.eval_episodes,
        curve_episodes=config.curve_episodes,
        batch_size=(config.lm_batch_size or config.batch_size) if tuned else config.batch_size,
        seed=seed,
        device=config.device,
        out_dir=str(Path(config.out_dir) / "runs"),
        tensorboard=False,
    )


def grid_run_names(config: ExperimentConfig) -> set[str]:
    """The folder names of every run the grid asks for, finished or not."""
    return {
        run_name(_train_config(config, dataset, method, seed))
        for dataset in config.datasets
        for method in config.methods
        for seed in config.seeds
    }


def _grid(config: ExperimentConfig) -> list[tuple[str, int, str]]:
    """(dataset, seed, method) of every run, in the order they run: a dataset's seeds one after
    another, every method of a seed before the next seed."""
    return [
        (dataset, seed, method)
        for dataset in config.datasets
        for seed in config.seeds
        for method in config.methods
    ]


def _finished(config: ExperimentConfig, train_config: TrainConfig, md5s: dict) -> bool:
    """Whether the run is finished: its folder has a result, or the ledger holds its record
    made from the dataset file that is here (a record of another draw is not this run)."""
    runs, name = Path(config.out_dir) / "runs", run_name(train_config)
    folder = finished_run(runs, name)
    if config.ledger is None:
        return folder is not None
    ledger = Ledger(config.ledger)
    if folder is not None:
        ledger.add(run_record(folder, json.loads((folder / "result.json").read_text())))
        return True
    record = ledger.get(name)
    if record is None:
        return False
    dataset = train_config.dataset_source
    if dataset not in md5s:
        md5s[dataset] = dataset_md5(dataset)
    return None in (record.get("dataset_md5"), md5s[dataset]) or (
        record["dataset_md5"] == md5s[dataset]
    )


def plan_experiment(config: ExperimentConfig) -> list[tuple[str, str, int, tuple[str, int]]]:
    """Every run of the grid in the order :func:`run_experiment` takes them: (dataset, method,
    seed, :func:`~lmencoders.train.run_state`)."""
    md5s: dict[str, str | None] = {}
    plan = []
    for dataset, seed, method in _grid(config):
        train_config = _train_config(config, dataset, method, seed)
        recorded = config.ledger is not None and _finished(config, train_config, md5s)
        state = ("finished", 0) if recorded else run_state(train_config)
        if state[0] != "finished":
            with held(_claim(config, train_config), look_only=True) as free:
                if not free:  # a lane has taken it, before its folder exists
                    state = ("running", state[1])
        plan.append((dataset, method, seed, state))
    return plan


def run_experiment(config: ExperimentConfig, command: str | None = None) -> dict[str, int]:
    """Run every missing (dataset, method, seed); returns counts of done/skipped/running/left
    runs. ``command``, the shell command that asked for them, is recorded in each run's result.
    A run that another process is running (a second lane of the same grid) is left to it."""
    started = time.perf_counter()
    counts = {"done": 0, "skipped": 0, "running": 0, "left": 0}
    md5s: dict[str, str | None] = {}
    prepared: set[str] = set()
    bar = tqdm(_grid(config), desc="experiment", unit="run")
    for dataset, seed, method in bar:
        train_config = _train_config(config, dataset, method, seed)
        if _finished(config, train_config, md5s):
            counts["skipped"] += 1
            continue
        with held(_claim(config, train_config)) as mine:
            if mine and _finished(config, train_config, md5s):  # by the lane that held it
                counts["skipped"] += 1
                continue
            if not mine or run_state(train_config)[0] == "running":
                counts["running"] += 1
                where = f"[{method}] {Path(dataset).name} seed {seed}"
                bar.write(f"{where}: running in another process")
                continue
            over = time.perf_counter() - started > (config.time_budget or 0)
            if config.time_budget is not None and over:
                counts["left"] += 1
                continue
            if dataset not in prepared and train_config.encoder == "lm":
                # at the dataset's first LM run, not its first run: the runs without an LM
                # (minutes) need not wait for an LM pass over the dataset (hours for FinRL)
                prepared.add(dataset)
                _precompute_together(config, dataset, _pending_methods(config, dataset))
            bar.write(f"[{method}] {Path(dataset).name} seed {seed}")
            result = train(train_config, command)
            if config.ledger is not None:
                Ledger(config.ledger).add(
                    run_record(Path(train_config.out_dir) / result["run"], result)
                )
        evaluation = result["evaluation"]
        bar.write(f"  return {evaluation['mean_return']:.1f} in {result['train_seconds']:.0f} s")
        counts["done"] += 1
    return counts


def _claim(config: ExperimentConfig, train_config: TrainConfig) -> Path:
    """The folder that the lane running this run holds (:func:`~lmencoders.resume.held`) from
    before it looks at the run's folders until its record is written. A run folder's own hold
    comes too late for lanes: two that reach a run together (as when both waited for one
    precompute) would both find it free while loading their data, and run it twice."""
    return Path(config.out_dir) / CLAIMS / run_name(train_config)


def _pending_methods(config: ExperimentConfig, dataset: str) -> set[str]:
    """The methods with an unfinished run on ``dataset``."""
    md5s: dict[str, str | None] = {}
    return {
        method
        for method in config.methods
        for seed in config.seeds
        if not _finished(config, _train_config(config, dataset, method, seed), md5s)
    }


def _precompute_together(config: ExperimentConfig, dataset: str, methods: set[str]) -> None:
    """When a dataset's pending runs read one frozen LM with both mean and per-piece pooling
    (LM-No-Tune and LM-Segments), one LM pass fills and caches both feature tables, where
    each run would otherwise pay for its own precompute."""
    frozen = {
        METHODS[m].pooling: m
        for m in methods
        if (METHODS[m].encoder, METHODS[m].tuning) == ("lm", "frozen")
    }
    if set(frozen) != {"mean", PIECE_POOLING}:
        return
    train_config = _train_config(config, dataset, frozen["mean"], config.seeds[0])
    data, _, description = training_data(train_config)
    lm_factory(train_config, description).precompute(
        data.buffer, device=config.device, also_pooling=PIECE_POOLING
    )
