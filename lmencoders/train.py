"""Train and evaluate one offline RL agent on a NeoRL-layout dataset (the CLI's engine)."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from pathlib import Path

import d3rlpy
import numpy as np

from .backbone import DEFAULT_MODEL
from .datasets import read_neorl_file, to_mdp_dataset
from .encoders import LMEncoderFactory
from .envs import description_for, episode_returns, make_env, normalized_score
from .errors import ConfigError
from .files import atomic_write

__all__ = [
    "ALGORITHMS",
    "TrainConfig",
    "train",
    "evaluate",
    "run_name",
    "shipped_dataset",
    "task_of_file",
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

_NAME = re.compile(r"^(?P<task>.+)-(?P<level>low|medium|high|expert)-(?P<n>\d+)-(?:train|val)")


def shipped_dataset() -> Path:
    """The small Hopper-v5 'low' dataset that ships with lmencoders (see its collect.json)."""
    return Path(__file__).parent / "data" / "Hopper-v5-low-30-train.npz"


def task_of_file(path: str | Path) -> str:
    match = _NAME.match(Path(path).name)
    if not match:
        raise ConfigError(f"{path}: not a NeoRL file name (<Task>-<level>-<N>-<train|val>.npz)")
    return match["task"]


@dataclasses.dataclass
class TrainConfig:
    dataset: str = ""  # NeoRL-layout .npz; empty: the shipped Hopper-v5 low dataset
    train_num: int | None = None  # keep the first trajectories only
    algo: str = "td3+bc"
    encoder: str = "lm"  # "lm" or "vector" (d3rlpy's default MLP encoders)
    tuning: str = "frozen"
    model: str = DEFAULT_MODEL
    description: str | None = None  # default: from the task
    env: str | None = None  # evaluation env; default: from the file name
    steps: int = 5_000
    eval_every: int = 0  # 0: evaluate at the end only
    eval_episodes: int = 5
    batch_size: int = 256
    seed: int = 0
    device: str = "cpu"
    out_dir: str = "runs"
    tensorboard: bool = True


def dataset_path(config: TrainConfig) -> Path:
    return Path(config.dataset) if config.dataset else shipped_dataset()


def run_name(config: TrainConfig) -> str:
    """The run's folder name: dataset, algorithm, encoder (and tuning), seed."""
    path = dataset_path(config)
    encoder = config.encoder + (f"-{config.tuning}" if config.encoder == "lm" else "")
    return f"{path.stem}-{config.algo}-{encoder}-seed{config.seed}"


def _algorithm(config: TrainConfig, description: str):
    """The algorithm, and its LM encoder factory (``None`` for vector encoders)."""
    scaler = d3rlpy.preprocessing.StandardObservationScaler()
    cls = ALGORITHMS[config.algo]
    kwargs = {"observation_scaler": scaler, "batch_size": config.batch_size}
    factory = None
    if config.encoder == "lm":
        factory = LMEncoderFactory(
            description=description,
            model=config.model,
            tuning=config.tuning,
            observation_scaler=scaler,
        )
        names = [f.name for f in dataclasses.fields(cls) if f.name.endswith("encoder_factory")]
        kwargs |= {name: factory for name in names}
    elif config.encoder != "vector":
        raise ConfigError(f"unknown encoder {config.encoder!r}; choose 'lm' or 'vector'")
    return cls(**kwargs).create(device=config.device), factory


def evaluate(algo, env_name: str, episodes: int, seed: int = 0) -> dict:
    """Mean and std of the return over ``episodes`` (seeded resets), and NeoRL's normalised
    score where NeoRL has references."""
    return _evaluation(algo, env_name, [make_env(env_name) for _ in range(episodes)], seed)


def _evaluation(algo, env_name: str, envs: list, seed: int) -> dict:
    returns = episode_returns(algo.predict, envs, seed)
    mean = float(np.mean(returns))
    return {
        "env": env_name,
        "episodes": len(envs),
        "mean_return": mean,
        "std_return": float(np.std(returns)),
        "normalized_score": normalized_score(env_name, mean),
    }


class ReturnEvaluator:
    """d3rlpy evaluator (the learning curve) that keeps its last full evaluation.

    d3rlpy evaluates after the last epoch, i.e. the final policy, so that evaluation is the
    run's result: no second pass over the episodes (costly when every step runs the LM)."""

    def __init__(self, env_name: str, episodes: int, seed: int) -> None:
        self.env_name, self.seed = env_name, seed
        self.envs = [make_env(env_name) for _ in range(episodes)]  # seeded resets: reusable
        self.last: dict | None = None

    def __call__(self, algo, dataset) -> float:
        self.last = _evaluation(algo, self.env_name, self.envs, self.seed)
        return self.last["mean_return"]


def train(config: TrainConfig) -> dict:
    """Fit on the dataset, save the model, evaluate; returns (and writes) a result record."""
    if config.eval_every and config.steps % config.eval_every:
        raise ConfigError(
            f"steps ({config.steps}) must be a multiple of eval_every ({config.eval_every}): "
            "d3rlpy trains whole epochs of eval_every steps"
        )
    if config.algo not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {config.algo!r}; choose one of {sorted(ALGORITHMS)}")
    path = dataset_path(config)
    data = read_neorl_file(path)
    if config.train_num:
        data = data.first(config.train_num)
    dataset = to_mdp_dataset(data)
    env_name = config.env or task_of_file(path)
    description = config.description or description_for(env_name)
    d3rlpy.seed(config.seed)
    algo, factory = _algorithm(config, description)
    name = run_name(config)
    out = Path(config.out_dir) / name
    if out.exists():  # a rerun, or an interrupted run: d3rlpy appends to its CSV files
        shutil.rmtree(out)
    out.mkdir(parents=True)
    started = time.perf_counter()
    if factory is not None and config.tuning == "frozen":
        factory.precompute(dataset, device=config.device)
    adapters = [d3rlpy.logging.FileAdapterFactory(root_dir=config.out_dir)]
    if config.tensorboard:
        tensorboard_dir = str(Path(config.out_dir) / "tensorboard")
        adapters.append(d3rlpy.logging.TensorboardAdapterFactory(root_dir=tensorboard_dir))
    evaluator = ReturnEvaluator(env_name, config.eval_episodes, seed=config.seed * 1000)
    algo.fit(
        dataset,
        n_steps=config.steps,
        n_steps_per_epoch=config.eval_every or config.steps,
        experiment_name=name,
        with_timestamp=False,
        logger_adapter=d3rlpy.logging.CombineAdapterFactory(adapters),
        evaluators={"environment": evaluator} if config.eval_every else None,
        save_interval=10**9,
    )
    train_seconds = time.perf_counter() - started
    if evaluator.last is None:  # no periodic evaluation: evaluate the final policy now
        evaluator(algo, dataset)
    algo.save(str(out / "model.d3"))
    result = {
        "config": dataclasses.asdict(config) | {"dataset": str(path), "description": description},
        "dataset_trajectories": data.num_trajectories,
        "dataset_mean_return": float(data.returns().mean()),
        "train_seconds": train_seconds,
        "model": str(out / "model.d3"),
        "evaluation": evaluator.last,
    }
    # Written last and atomically: its presence marks the run as finished (experiments skip it).
    atomic_write(out / "result.json", lambda f: f.write(json.dumps(result, indent=1).encode()))
    return result
