"""Train and evaluate one offline RL agent (the CLI's engine).

A run never destroys another: each configuration has its own folder name (dataset,
algorithm, encoder, seed, and a hash of every other setting that decides the result), a rerun
of a finished configuration gets a fresh folder beside the earlier ones, one killed after an
epoch goes on from its checkpoint (:mod:`lmencoders.resume`), the model is saved before it is
evaluated, and ``result.json``, written last and atomically, marks a finished run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import d3rlpy
import numpy as np
import torch
from d3rlpy.algos.utility import build_scalers_with_transition_picker

from .backbone import DEFAULT_MODEL, POOLING_NAMES, PRECISIONS, TUNING_MODES, check_precision
from .checks import non_negative, optional_positive, positive
from .datasets import OfflineDataset, dataset_md5, load_dataset, shipped_dataset
from .encoders import LMEncoderFactory
from .envs import description_for, episode_returns, make_env, normalized_score
from .errors import ConfigError
from .files import atomic_write
from .machine import processor_name
from .options import option
from .resume import (
    CHECKPOINT,
    AppendingFileAdapterFactory,
    Checkpoint,
    ContinuedLogs,
    held,
    keep_logs_until,
    load_checkpoint,
    save_checkpoint,
)
from .sampling import flat_sampling
from .saving import MODEL_WEIGHTS, save_model

__all__ = [
    "ALGORITHMS",
    "TrainConfig",
    "train",
    "evaluate",
    "run_name",
    "finished_run",
    "run_state",
]

ALGORITHMS = {
    "td3+bc": d3rlpy.algos.TD3PlusBCConfig,
    "cql": d3rlpy.algos.CQLConfig,
    "iql": d3rlpy.algos.IQLConfig,
    "bcq": d3rlpy.algos.BCQConfig,
    "plas": d3rlpy.algos.PLASConfig,
    "bc": d3rlpy.algos.BCConfig,
    "awac": d3rlpy.algos.AWACConfig,
}
ENCODERS = ("lm", "vector")
# Settings that do not change what a run learns: they stay out of its folder name.
_NOT_IN_NAME = ("out_dir", "tensorboard", "device")


@dataclasses.dataclass
class TrainConfig:
    """One training run. Fields are the ``lmencoders train`` options."""

    dataset: str = option(
        "",
        "NeoRL-layout .npz, d3rlpy .h5 or minari:<dataset id> (default: the Hopper-v5 data "
        "that ships with lmencoders)",
    )
    train_num: int | None = option(None, "keep only the first trajectories")
    algo: str = option("td3+bc", "offline RL algorithm", choices=sorted(ALGORITHMS))
    encoder: str = option(
        "lm", "lm: the language-model encoder; vector: d3rlpy's MLP", choices=ENCODERS
    )
    tuning: str = option("frozen", "what the LM trains", choices=sorted(TUNING_MODES))
    pooling: str = option(
        "mean",
        "how the LM's token states become features (segments: one per piece, frozen LM)",
        choices=sorted(POOLING_NAMES),
    )
    standardize_features: bool = option(
        False,
        "standardise each frozen LM feature with its dataset mean and std (LMEncoderFactory "
        "standardize_features)",
    )
    action_samples: int | None = option(
        None,
        "actions sampled per state by algorithms that sample them (BCQ, CQL, AWAC; default: "
        "d3rlpy's, 100 for BCQ where the BCQ paper uses 10)",
    )
    model: str = option(DEFAULT_MODEL, "Hugging Face name or local directory of the LM")
    description: str | None = option(
        None, "shipped description name or YAML path (default: the task's)"
    )
    precision: str = option(
        "float32",
        "the LM's forward: float32, or bfloat16 autocast (GPUs, CPUs with bf16 units)",
        choices=PRECISIONS,
    )
    env: str | None = option(None, "evaluation environment (default: the one the data names)")
    steps: int = option(5_000, "gradient steps")
    eval_every: int | None = option(
        None,
        "steps between evaluations, each printed (default: five over the run, when steps "
        "divide by 5); 0: evaluate at the end only",
    )
    eval_episodes: int = option(5, "evaluation episodes")
    curve_episodes: int | None = option(
        None,
        "episodes of the evaluations before the last (the learning curve; default: "
        "eval_episodes); the last one, the run's result, uses eval_episodes",
    )
    batch_size: int = option(256, "transitions per gradient step")
    seed: int = option(0, "random seed (d3rlpy, evaluation resets)")
    device: str = option("cpu", "torch device, e.g. cpu or cuda:0")
    out_dir: str = option("runs", "folder of the run folders", flag="--out")
    tensorboard: bool = option(True, "write tensorboard logs under <out>/tensorboard")

    def __post_init__(self) -> None:
        if self.algo not in ALGORITHMS:
            raise ConfigError(
                f"unknown algorithm {self.algo!r}; choose one of {sorted(ALGORITHMS)}"
            )
        if self.encoder not in ENCODERS:
            raise ConfigError(f"unknown encoder {self.encoder!r}; choose one of {ENCODERS}")
        if self.tuning not in TUNING_MODES:
            raise ConfigError(
                f"unknown tuning {self.tuning!r}; choose one of {sorted(TUNING_MODES)}"
            )
        check_precision(self.precision)
        if self.pooling not in POOLING_NAMES:
            raise ConfigError(
                f"unknown pooling {self.pooling!r}; choose one of {sorted(POOLING_NAMES)}"
            )
        if self.standardize_features and (self.encoder, self.tuning) != ("lm", "frozen"):
            raise ConfigError(
                "standardize_features applies to a frozen LM's features (encoder 'lm', tuning "
                f"'frozen'), not to encoder {self.encoder!r} with tuning {self.tuning!r}"
            )
        if self.action_samples is not None:
            self.action_samples = positive(self.action_samples, "action_samples")
            if not _samples_actions(self.algo):
                samplers = sorted(a for a in ALGORITHMS if _samples_actions(a))
                raise ConfigError(
                    f"action_samples applies to algorithms that sample actions ({samplers}), "
                    f"not to {self.algo!r}"
                )
        self.steps = positive(self.steps, "steps")
        if self.eval_every is None:  # a learning curve of five points by default
            self.eval_every = self.steps // 5 if self.steps % 5 == 0 else 0
        self.eval_every = non_negative(self.eval_every, "eval_every")
        self.eval_episodes = positive(self.eval_episodes, "eval_episodes")
        self.curve_episodes = optional_positive(self.curve_episodes, "curve_episodes")
        if self.curve_episodes is not None and self.curve_episodes > self.eval_episodes:
            raise ConfigError(
                f"curve_episodes ({self.curve_episodes}) must be <= eval_episodes "
                f"({self.eval_episodes}): the curve's episodes are the first of the final ones"
            )
        self.batch_size = positive(self.batch_size, "batch_size")
        self.seed = non_negative(self.seed, "seed")
        if self.train_num is not None:
            self.train_num = positive(self.train_num, "train_num")
        if self.eval_every and self.steps % self.eval_every:
            raise ConfigError(
                f"steps ({self.steps}) must be a multiple of eval_every ({self.eval_every}): "
                "d3rlpy trains whole epochs of eval_every steps"
            )

    @property
    def dataset_source(self) -> str:
        return self.dataset or str(shipped_dataset())


def _dataset_identity(source: str) -> str:
    """What names a dataset in a run's hash: its file name and size (folders differ between
    machines), or the Minari id."""
    path = Path(source)
    if path.is_file():
        return f"{path.name}:{path.stat().st_size}"
    return source


def _samples_actions(algo: str) -> bool:
    return any(f.name == "n_action_samples" for f in dataclasses.fields(ALGORITHMS[algo]))


def run_name(config: TrainConfig) -> str:
    """The run's folder name: dataset, algorithm, encoder (and tuning), seed, and a hash of
    every other setting that decides what the run learns."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in _NOT_IN_NAME} | {
        "dataset": _dataset_identity(config.dataset_source)
    }
    # settings added later: as before they existed, the same names
    for added_later in ("curve_episodes", "standardize_features", "action_samples"):
        if settings[added_later] in (None, False):
            del settings[added_later]
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    source = config.dataset_source
    stem = (
        source.removeprefix("minari:").replace("/", "-")
        if source.startswith("minari:")
        else Path(source).stem
    )
    encoder = config.encoder
    if config.encoder == "lm":
        encoder += f"-{config.tuning}" + ("" if config.pooling == "mean" else f"-{config.pooling}")
        encoder += "-standardized" if config.standardize_features else ""
    algo = config.algo + (f"-{config.action_samples}samples" if config.action_samples else "")
    return f"{stem}-{algo}-{encoder}-seed{config.seed}-{digest}"


def _attempts(out_dir: Path, name: str) -> list[Path]:
    """The folders of a configuration's runs: ``name``, ``name-2``, ``name-3``..."""
    found = [out_dir / name] + sorted(
        (p for p in out_dir.glob(f"{name}-*") if p.name[len(name) + 1 :].isdigit()),
        key=lambda p: int(p.name[len(name) + 1 :]),
    )
    return [p for p in found if p.is_dir()]


def finished_run(out_dir: str | Path, name: str) -> Path | None:
    """The newest finished run (one with ``result.json``) of a configuration, if any."""
    done = [p for p in _attempts(Path(out_dir), name) if (p / "result.json").is_file()]
    return done[-1] if done else None


def run_state(config: TrainConfig) -> tuple[str, int]:
    """Where a run of ``config`` stands: ("finished", 0), ("running", step) when another
    process holds its newest attempt, ("to continue", step) from that attempt's checkpoint,
    or ("to start", 0)."""
    out_dir, name = Path(config.out_dir), run_name(config)
    if finished_run(out_dir, name) is not None:
        return "finished", 0
    attempts = _attempts(out_dir, name)
    if not attempts:
        return "to start", 0
    with held(attempts[-1], look_only=True) as free:
        checkpoint = load_checkpoint(attempts[-1])
    step = checkpoint.epoch * (config.eval_every or config.steps) if checkpoint else 0
    if not free:
        return "running", step
    return ("to continue", step) if checkpoint else ("to start", 0)


def _new_run_dir(out_dir: Path, name: str) -> Path:
    """A fresh folder for the run; an existing one (finished or not) is never touched."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for attempt in itertools.count(1):
        folder = out_dir / (name if attempt == 1 else f"{name}-{attempt}")
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder
    raise AssertionError("unreachable")


def _algorithm(config: TrainConfig, description: str) -> tuple[Any, LMEncoderFactory | None]:
    """The algorithm, and its LM encoder factory (``None`` for vector encoders)."""
    cls = ALGORITHMS[config.algo]
    kwargs: dict[str, Any] = {
        "observation_scaler": d3rlpy.preprocessing.StandardObservationScaler(),
        "batch_size": config.batch_size,
    }
    if config.algo == "plas":
        # d3rlpy's PLAS trains only its VAE for warmup_steps (500,000 by default: half of the
        # 1M-step protocol it comes from), so at any shorter run its actor and critics would
        # never train. Keep the protocol's split: the VAE alone for the first half of the run.
        kwargs["warmup_steps"] = config.steps // 2
    if config.action_samples is not None:
        kwargs["n_action_samples"] = config.action_samples
    factory = None
    if config.encoder == "lm":
        factory = lm_factory(config, description)
        names = [f.name for f in dataclasses.fields(cls) if f.name.endswith("encoder_factory")]
        kwargs |= {name: factory for name in names}
    return cls(**kwargs).create(device=config.device), factory


def lm_factory(config: TrainConfig, description: str) -> LMEncoderFactory:
    """The LM encoder factory of a run (``encoder="lm"``)."""
    return LMEncoderFactory(
        description=description,
        model=config.model,
        tuning=config.tuning,
        pooling=config.pooling,
        precision=config.precision,
        standardize_features=config.standardize_features,
    )


def training_data(config: TrainConfig) -> tuple[Any, str, str]:
    """A run's dataset, its evaluation environment and the description of its observations."""
    dataset = load_dataset(config.dataset_source, config.train_num)
    env_name = config.env or dataset.env
    if env_name is None:
        raise ConfigError(f"{dataset.source}: the data names no environment; give env=/--env")
    description = config.description or description_for(
        env_name, int(dataset.buffer.episodes[0].observations.shape[-1])
    )
    return dataset, env_name, description


def evaluate(algo: Any, env_name: str, episodes: int, seed: int = 0) -> dict:
    """Mean and std of the return over ``episodes`` (seeded resets), and NeoRL's normalised
    score where NeoRL has references."""
    return _evaluation(
        algo, env_name, [make_env(env_name) for _ in range(positive(episodes, "episodes"))], seed
    )


def _evaluation(algo: Any, env_name: str, envs: list, seed: int) -> dict:
    returns = episode_returns(algo.predict, envs, seed, show_progress=True)
    mean = float(np.mean(returns))
    return {
        "env": env_name,
        "episodes": len(envs),
        "mean_return": mean,
        "std_return": float(np.std(returns)),
        "normalized_score": normalized_score(env_name, mean),
    }


def evaluation_text(evaluation: dict) -> str:
    """``return on <env> over <n> episodes: <mean> +- <std>, normalised score <s>``."""
    score = evaluation["normalized_score"]
    normalized = f", normalised score {score:.1f}" if score is not None else ""
    return (
        f"return on {evaluation['env']} over {evaluation['episodes']} episodes: "
        f"{evaluation['mean_return']:.1f} +- {evaluation['std_return']:.1f}{normalized}"
    )


class ReturnEvaluator:
    """d3rlpy evaluator (the learning curve) that saves the model first, then evaluates, and
    keeps its last full evaluation.

    d3rlpy evaluates after the last epoch, i.e. the final policy, so that evaluation is the
    run's result: no second pass over the episodes (costly when every step runs the LM)."""

    def __init__(
        self,
        env_name: str,
        episodes: int,
        seed: int,
        folder: Path,
        every: int = 0,
        *,
        curve_episodes: int | None = None,
        evaluations: int = 0,
    ) -> None:
        self.env_name, self.seed, self.folder, self.every = env_name, seed, folder, every
        self.envs = [make_env(env_name) for _ in range(episodes)]  # seeded resets: reusable
        # the learning curve's points may use fewer (the first) episodes than the last one
        self.curve_episodes = curve_episodes or episodes
        self.evaluations = evaluations
        self.last: dict | None = None
        self.seconds = 0.0  # spent evaluating: with a live LM on CPU, most of a run
        self.done = 0

    def state(self) -> dict:
        """What a continued run needs of the curve so far (see :mod:`lmencoders.resume`)."""
        return {"done": self.done, "seconds": self.seconds, "last": self.last}

    def restore(self, state: dict) -> None:
        self.done, self.seconds, self.last = state["done"], state["seconds"], state["last"]

    def __call__(self, algo: Any, dataset: Any = None) -> float:
        save_model(algo, self.folder)  # an evaluation that fails loses no training
        started = time.perf_counter()
        final = self.done + 1 >= self.evaluations
        envs = self.envs if final else self.envs[: self.curve_episodes]
        self.last = _evaluation(algo, self.env_name, envs, self.seed)
        self.seconds += time.perf_counter() - started
        self.done += 1
        if self.every:  # the learning curve, as it grows
            print(f"step {self.done * self.every}: {evaluation_text(self.last)}", flush=True)
        return self.last["mean_return"]


def hardware(device: str) -> str:
    """What a run trained on, for the report: the GPU's name, or the CPU's and its threads."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    threads = torch.get_num_threads()
    return f"{processor_name()}, {threads} thread" + ("s" if threads > 1 else "")


class _TensorboardAdapter(d3rlpy.logging.TensorboardAdapter):
    """d3rlpy's adapter writes hyper-parameters into ``runs/<name>/<name>``; this one writes
    them beside the scalars, in ``runs/<name>``."""

    def after_write_metric(self, epoch: int, step: int) -> None:
        self._writer.add_hparams(self._params, self._metrics, name=".", global_step=epoch)


class _TensorboardAdapterFactory(d3rlpy.logging.TensorboardAdapterFactory):
    def create(
        self, algo: Any, experiment_name: str, n_steps_per_epoch: int
    ) -> _TensorboardAdapter:
        return _TensorboardAdapter(algo, self._root_dir, experiment_name)


def evaluation_cost(env_name: str, episodes: int, encoder: str) -> str:
    """One line saying what an evaluation will cost, printed before it starts."""
    env = make_env(env_name)
    horizon = env.spec.max_episode_steps if env.spec and env.spec.max_episode_steps else None
    if horizon is None and hasattr(env.unwrapped, "dates"):
        horizon = len(env.unwrapped.dates) - 1
    steps = f"up to {horizon} steps each" if horizon else "steps until each episode ends"
    lm = (
        f"; the LM encodes all live episodes once per step (up to {horizon} LM passes)"
        if encoder == "lm" and horizon
        else ""
    )
    return f"evaluation on {env_name}: {episodes} episodes, {steps}{lm}"


def train(config: TrainConfig, command: str | None = None) -> dict:
    """Fit on the dataset, save the model, evaluate; returns (and writes) a result record.
    ``command``: the shell command that asked for the run, kept in the record so that a
    report says how each of its runs was made, on whichever machine it ran.

    A run killed after an epoch is continued by the next call with the same settings
    (:mod:`lmencoders.resume`)."""
    dataset, env_name, description = training_data(config)
    d3rlpy.seed(config.seed)
    algo, factory = _algorithm(config, description)
    with _run_folder(Path(config.out_dir), run_name(config)) as (out, checkpoint):
        per_epoch = config.eval_every or config.steps
        continued = f", continued from step {checkpoint.epoch * per_epoch}" if checkpoint else ""
        print(f"run folder: {out}{continued}", flush=True)
        started = time.perf_counter() - (checkpoint.train_seconds if checkpoint else 0.0)
        if factory is not None and config.tuning == "frozen":
            factory.precompute(dataset.buffer, device=config.device)
        print(evaluation_cost(env_name, config.eval_episodes, config.encoder), flush=True)
        evaluator = ReturnEvaluator(
            env_name,
            config.eval_episodes,
            config.seed * 1000,
            out,
            every=config.eval_every,
            curve_episodes=config.curve_episodes,
            evaluations=config.steps // config.eval_every if config.eval_every else 1,
        )
        _fit(algo, flat_sampling(dataset.buffer), config, out, evaluator, checkpoint, started)
        train_seconds = time.perf_counter() - started  # every attempt's, when continued
        if evaluator.last is None:  # no periodic evaluation: save, then evaluate the final policy
            evaluator(algo)
        result = _write_result(config, dataset, description, out, train_seconds, evaluator, command)
        (out / CHECKPOINT).unlink(missing_ok=True)
        return result


def _fit(
    algo: Any,
    batches: Any,
    config: TrainConfig,
    out: Path,
    evaluator: ReturnEvaluator,
    checkpoint: Checkpoint | None,
    started: float,
) -> None:
    """d3rlpy's fit, epoch by epoch, from the checkpoint if there is one; a checkpoint after
    each epoch (``started``: when the run began, by ``time.perf_counter``, earlier attempts
    included)."""
    per_epoch = config.eval_every or config.steps
    done = checkpoint.epoch if checkpoint else 0
    files = AppendingFileAdapterFactory if checkpoint else d3rlpy.logging.FileAdapterFactory
    adapters: list = [files(root_dir=str(out.parent))]
    if config.tensorboard:
        adapters.append(_TensorboardAdapterFactory(root_dir=str(out.parent / "tensorboard")))
    if checkpoint:
        build_scalers_with_transition_picker(algo, batches)
        algo.build_with_dataset(batches)
        evaluator.restore(checkpoint.evaluator)
        keep_logs_until(out, done)
        checkpoint.restore(algo)  # the random generators last: nothing may draw after it
    if done * per_epoch == config.steps:  # killed after its last epoch: only evaluate, write
        return
    epochs = algo.fitter(
        batches,
        n_steps=config.steps - done * per_epoch,
        n_steps_per_epoch=per_epoch,
        experiment_name=out.name,
        with_timestamp=False,
        logger_adapter=ContinuedLogs(adapters, done, done * per_epoch),
        evaluators={"environment": evaluator} if config.eval_every else None,
        save_interval=10**9,
    )
    for epoch, _ in epochs:  # d3rlpy has logged the epoch: a checkpoint of where it stands
        seconds = time.perf_counter() - started
        state = evaluator.state()
        save_checkpoint(algo, out, epoch=done + epoch, train_seconds=seconds, evaluator=state)


@contextlib.contextmanager
def _run_folder(out_dir: Path, name: str) -> Iterator[tuple[Path, Checkpoint | None]]:
    """The configuration's newest attempt and its checkpoint when it was killed after one and
    no other process is running it (the run goes on there), else a fresh folder; held by this
    process until the block ends."""
    attempts = _attempts(out_dir, name)
    if attempts and not (attempts[-1] / "result.json").is_file():
        with held(attempts[-1]) as free:
            checkpoint = load_checkpoint(attempts[-1]) if free else None
            if checkpoint is not None:
                yield attempts[-1], checkpoint
                return
    folder = _new_run_dir(out_dir, name)
    with held(folder):
        yield folder, None


def _write_result(
    config: TrainConfig,
    dataset: OfflineDataset,
    description: str,
    out: Path,
    train_seconds: float,
    evaluator: ReturnEvaluator,
    command: str | None,
) -> dict:
    result = {
        "config": dataclasses.asdict(config)
        | {"dataset": dataset.source, "description": description},
        "run": out.name,
        "dataset_md5": dataset_md5(dataset.source),
        "dataset_trajectories": dataset.trajectories,
        "dataset_mean_return": float(dataset.returns().mean()),
        "train_seconds": train_seconds,  # the whole run, its evaluations included
        "evaluation_seconds": evaluator.seconds,
        "hardware": hardware(config.device),
        "command": command,
        "model": str(out / MODEL_WEIGHTS),
        "evaluation": evaluator.last,
    }
    # Written last and atomically: its presence marks the run as finished (experiments skip it).
    atomic_write(out / "result.json", lambda f: f.write(json.dumps(result, indent=1).encode()))
    return result
