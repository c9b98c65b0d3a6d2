"""NeoRL-style datasets for any gymnasium continuous-control environment.

NeoRL's protocol: train a SAC behaviour policy, keep the policies whose return is about 25%,
50% and 75% of the best return reached (low, medium, high), and roll each out with the policy
mean 80% of the time and a sampled action 20% of the time, in episodes of up to 1000 steps.
The result is written in NeoRL's own layout (``lmencoders.datasets`` reads it back).

Each stage leaves finished files behind and is skipped when they exist, so an interrupted run
resumes; every file is written to a temporary name and renamed, so nothing half-written ever
looks complete. ``--policies DIR`` keeps what remakes the files without SAC (the checkpoint list
and each level's policy, the policy network alone) in a small folder to commit: SAC takes hours
on a CPU, a rollout from a kept policy minutes. It makes the same files on the same CPU and
package versions (``made_on`` in ``collect.json``); elsewhere float rounding differs, a MuJoCo
episode grows the difference, and the files are another draw of the same protocol.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import d3rlpy
import gymnasium as gym
import numpy as np
import torch
from tqdm.auto import tqdm

from .checks import non_negative, positive
from .datasets import read_neorl_file
from .envs import episode_returns, kept_positions, make_env
from .errors import ConfigError
from .files import atomic_write
from .machine import made_on
from .options import option
from .saving import load_model, save_model, save_policy

__all__ = ["CollectConfig", "collect", "rollout", "pick_policies", "shared_checkpoints"]

LEVEL_FRACTIONS = {"low": 0.25, "medium": 0.5, "high": 0.75}


@dataclasses.dataclass
class CollectConfig:
    """A collection run. Fields are the ``lmencoders collect`` options."""

    env: str = option(
        "Hopper-v5", "gymnasium id or finance (MuJoCo tasks keep the x position, as NeoRL)"
    )
    out_dir: str = option("neorl-data", "output folder", flag="--out")
    sac_steps: int = option(100_000, "SAC environment steps")
    checkpoint_every: int = option(5_000, "SAC steps between saved, evaluated policies")
    eval_episodes: int = option(5, "episodes that evaluate each SAC checkpoint")
    selection_episodes: int = option(
        20,
        "episodes that evaluate every checkpoint again, once SAC is done, to pick the levels "
        "from (0: pick from the eval_episodes returns)",
    )
    levels: tuple[str, ...] = option(
        ("low", "medium", "high"), "dataset levels to make", choices=LEVEL_FRACTIONS
    )
    train_trajectories: int = option(100, "train trajectories per level", flag="--train")
    val_trajectories: int = option(10, "val trajectories per level", flag="--val")
    max_episode_steps: int = option(1000, "episode length limit of the rollouts")
    sample_probability: float = option(0.2, "chance of a sampled (not the mean) action")
    scale_observations: bool = option(
        False, "standardise SAC's inputs with statistics of random-action rollouts (FinRL)"
    )
    sac_sees_positions: bool = option(
        False,
        "SAC's own inputs keep the x position; by default SAC sees gymnasium's observation "
        "(without it) and the data still record NeoRL's full layout",
    )
    stop_at_return: float | None = option(
        None, "stop SAC at the first checkpoint whose mean return reaches this"
    )
    seed: int = option(0, "random seed (not 0: file names end in -seed<N>, a second draw)")
    policies_dir: str | None = option(
        None,
        "a folder (commit it) that keeps the SAC checkpoint list and each level's policy; when "
        "it holds them, the same command remakes the files without training SAC (the same files "
        "on the same CPU and package versions)",
        flag="--policies",
    )

    def __post_init__(self) -> None:
        self.levels = tuple(self.levels)
        for name in ("sac_steps", "checkpoint_every", "eval_episodes", "train_trajectories"):
            setattr(self, name, positive(getattr(self, name), name))
        for name in ("val_trajectories", "seed", "selection_episodes"):
            setattr(self, name, non_negative(getattr(self, name), name))
        self.max_episode_steps = positive(self.max_episode_steps, "max_episode_steps")
        unknown = [level for level in self.levels if level not in LEVEL_FRACTIONS]
        if unknown or not self.levels:
            raise ConfigError(f"levels must be among {list(LEVEL_FRACTIONS)}, got {self.levels}")
        if not 0.0 <= self.sample_probability <= 1.0:
            raise ConfigError(
                f"sample_probability must be within [0, 1], got {self.sample_probability!r}"
            )
        if self.checkpoint_every > self.sac_steps:
            raise ConfigError(
                f"checkpoint_every ({self.checkpoint_every}) is more than sac_steps "
                f"({self.sac_steps}): no policy would be saved"
            )


def random_action_scaler(
    env: gym.Env, steps: int, seed: int
) -> d3rlpy.preprocessing.StandardObservationScaler:
    """Mean and std of the observations met under uniformly random actions.

    SAC learns nothing from raw inputs of very different scales (FinRL: cash ~1e6 next to
    RSI ~50); d3rlpy cannot fit a standard scaler from an environment, so it is fitted here."""
    env.action_space.seed(seed)
    obs, _ = env.reset(seed=seed)
    seen = [obs]
    for _ in range(steps):
        obs, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            obs, _ = env.reset()
        seen.append(obs)
    seen = np.asarray(seen, dtype=np.float64)
    return d3rlpy.preprocessing.StandardObservationScaler(mean=seen.mean(0), std=seen.std(0))


def policy_returns(sac: Any, envs: list[gym.Env], start: int, seed: int) -> np.ndarray:
    """Returns of the deterministic policy over one episode per env (lockstep, seeded), the
    policy reading observations from entry ``start``."""
    return episode_returns(lambda o: sac.predict(o[:, start:]), envs, seed=seed)


def sac_input_start(config: CollectConfig) -> int:
    """Index of SAC's first input in a NeoRL-layout observation.

    NeoRL's MuJoCo layout starts with the absolute x position, which grows without bound as
    the robot advances: a policy that reads it meets values it never trained on exactly when
    it runs well (SAC on Hopper with x plateaued near 600 over 200k steps here). The behaviour
    policy therefore sees what gymnasium gives by default; the recorded data keep x."""
    return 0 if config.sac_sees_positions else kept_positions(config.env)


def policy_input_start(algo: d3rlpy.base.LearnableBase, env: gym.Env) -> int:
    """Where a saved policy's inputs begin in ``env``'s observations (policies saved before
    SAC left out the x position read the whole observation)."""
    full = env.observation_space.shape[0]
    own = algo.impl.observation_shape[0]
    if not 0 <= full - own <= kept_positions(env.spec.id if env.spec else ""):
        raise ConfigError(
            f"the policy reads {own} observation entries, the environment gives {full}"
        )
    return full - own


def without_leading(env: gym.Env, start: int) -> gym.Env:
    """``env`` whose observations skip their first ``start`` entries (SAC's own view)."""
    if not start:
        return env
    space = env.observation_space
    view = gym.spaces.Box(space.low[start:], space.high[start:], dtype=space.dtype)
    return gym.wrappers.TransformObservation(env, lambda obs: obs[start:], view)


def _save_buffer(buffer: d3rlpy.dataset.ReplayBuffer, path: Path) -> None:
    data = io.BytesIO()  # h5py needs a readable file; the temporary one is write-only
    buffer.dump(data)
    atomic_write(path, lambda f: f.write(data.getvalue()))


def _load_buffer(path: Path, limit: int) -> d3rlpy.dataset.ReplayBuffer | None:
    """SAC's replay buffer as saved at its last checkpoint; ``None`` if absent or unreadable."""
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            return d3rlpy.dataset.ReplayBuffer.load(f, d3rlpy.dataset.FIFOBuffer(limit))
    except Exception as exc:  # a broken file costs the buffer, never the run
        warnings.warn(
            f"{path}: unreadable SAC replay buffer ({exc}); starting a new one", stacklevel=2
        )
        return None


def train_behaviour_policies(config: CollectConfig, folder: Path) -> list[dict]:
    """SAC online, one saved policy and its mean return per ``checkpoint_every`` steps.

    Resumable: every checkpoint saves the policy with its critics and optimiser states, the
    replay buffer, and the list of checkpoints so far (``sac-progress.json``); a run that dies
    goes on from its last checkpoint. With ``stop_at_return``, SAC stops at the first
    checkpoint that reaches it. ``sac-checkpoints.json`` marks the finished stage."""
    log_path = folder / "sac-checkpoints.json"
    if log_path.is_file():
        return json.loads(log_path.read_text())
    progress_path = folder / "sac-progress.json"
    buffer_path = folder / "sac-buffer.h5"
    history: list[dict] = json.loads(progress_path.read_text()) if progress_path.is_file() else []
    d3rlpy.seed(config.seed + len(history))
    start = sac_input_start(config)
    env = without_leading(make_env(config.env), start)
    eval_envs = [make_env(config.env) for _ in range(config.eval_episodes)]
    env.reset(seed=config.seed + len(history))
    warmup = 0
    if history:
        last = history[-1]
        sac = load_model(folder / last["path"], trust_pickle=last["path"].endswith(".d3"))
        seen = policy_input_start(sac, eval_envs[0])
        if seen != start:
            raise ConfigError(
                f"{folder}: its SAC policies read observations from entry {seen}, these "
                f"settings from entry {start}: resume with the same --sac-sees-positions "
                "setting, or collect into a new folder"
            )
        buffer = _load_buffer(buffer_path, config.sac_steps)
        if buffer is None:  # learn from fresh experience of the current policy first
            buffer = d3rlpy.dataset.create_fifo_replay_buffer(limit=config.sac_steps, env=env)
            warmup = min(10_000, config.checkpoint_every)
        print(f"resuming SAC after step {last['step']} (return {last['return']:.1f})")
    else:
        scaler = None
        if config.scale_observations:
            scaler = random_action_scaler(
                without_leading(make_env(config.env), start), 5_000, config.seed
            )
        sac = d3rlpy.algos.SACConfig(batch_size=256, observation_scaler=scaler).create()
        buffer = d3rlpy.dataset.create_fifo_replay_buffer(limit=config.sac_steps, env=env)
    first = history[-1]["step"] + config.checkpoint_every if history else config.checkpoint_every
    for step in range(first, config.sac_steps + 1, config.checkpoint_every):
        sac.fit_online(
            env,
            buffer,
            n_steps=config.checkpoint_every,
            n_steps_per_epoch=config.checkpoint_every,
            random_steps=min(5_000, config.checkpoint_every)
            if step == config.checkpoint_every
            else 0,
            update_start_step=warmup,
            save_interval=10**9,
            logger_adapter=d3rlpy.logging.NoopAdapterFactory(),
            show_progress=True,
        )
        warmup = 0
        path = save_model(sac, folder / "policies" / f"sac-{step}")
        score = float(np.mean(policy_returns(sac, eval_envs, start, seed=10_000)))
        history.append({"step": step, "return": score, "path": str(path.relative_to(folder))})
        _save_buffer(buffer, buffer_path)
        atomic_write(progress_path, lambda f: f.write(json.dumps(history, indent=1).encode()))
        print(f"SAC step {step}: mean return {score:.1f}", flush=True)
        if config.stop_at_return is not None and score >= config.stop_at_return:
            print(f"SAC reached {config.stop_at_return}: stopping at step {step}", flush=True)
            break
    atomic_write(log_path, lambda f: f.write(json.dumps(history, indent=1).encode()))
    buffer_path.unlink(missing_ok=True)  # only needed to resume; the policies stay
    return history


def selection_returns(config: CollectConfig, folder: Path, history: list[dict]) -> list[dict]:
    """Every checkpoint's mean return over ``selection_episodes`` episodes, computed once and
    kept in ``sac-checkpoints.json``. The few episodes that evaluate each checkpoint during
    SAC are too noisy to pick levels from (Hopper, SAC step 210k: 734.9 over 5 episodes,
    1203.5 +- 537.6 over 20)."""
    if not config.selection_episodes:
        return history
    log_path = folder / "sac-checkpoints.json"
    envs = [make_env(config.env) for _ in range(config.selection_episodes)]
    todo = [h for h in history if "selection_return" not in h]
    for checkpoint in tqdm(todo, desc="re-evaluating SAC checkpoints", unit="checkpoint"):
        path = checkpoint["path"]
        sac = load_model(folder / path, trust_pickle=path.endswith(".d3"))
        returns = policy_returns(sac, envs, policy_input_start(sac, envs[0]), seed=20_000)
        checkpoint["selection_return"] = float(np.mean(returns))
        checkpoint["selection_std"] = float(np.std(returns))
        atomic_write(log_path, lambda f: f.write(json.dumps(history, indent=1).encode()))
    return history


def _level_return(checkpoint: dict) -> float:
    return checkpoint.get("selection_return", checkpoint["return"])


def pick_policies(history: list[dict], levels: tuple[str, ...]) -> dict[str, dict]:
    """For each level, the checkpoint whose return (re-evaluated, where it was) is closest to
    its fraction of the best."""
    best = max(_level_return(h) for h in history)
    return {
        level: min(history, key=lambda h: abs(_level_return(h) - LEVEL_FRACTIONS[level] * best))
        for level in levels
    }


def shared_checkpoints(chosen: dict[str, dict]) -> dict[int, list[str]]:
    """SAC steps that more than one level would come from (a run too short to tell them
    apart), with those levels."""
    levels_of: dict[int, list[str]] = {}
    for level, checkpoint in chosen.items():
        levels_of.setdefault(checkpoint["step"], []).append(level)
    return {step: levels for step, levels in levels_of.items() if len(levels) > 1}


def _announce(chosen: dict[str, dict]) -> dict[int, list[str]]:
    for level, checkpoint in chosen.items():
        print(
            f"{level}: SAC step {checkpoint['step']} (return {_level_return(checkpoint):.1f})",
            flush=True,
        )
    shared = shared_checkpoints(chosen)
    for step, levels in shared.items():
        warnings.warn(
            f"levels {levels} all come from the same SAC checkpoint (step {step}): their data "
            f"differ only by sampling noise. Train SAC longer (--sac-steps) or save checkpoints "
            f"more often (--checkpoint-every)",
            stacklevel=2,
        )
    return shared


def rollout(
    algo: d3rlpy.algos.QLearningAlgoBase,
    env: gym.Env,
    *,
    trajectories: int,
    max_steps: int,
    sample_probability: float,
    seed: int,
) -> dict[str, np.ndarray]:
    """Trajectories in NeoRL's layout: the policy mean with probability 1 - sample_probability,
    a sampled action otherwise (the policy reads the observation from its own first input)."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)  # the policy's sampled actions: the same seed, the same data
    start = policy_input_start(algo, env)
    columns: dict[str, list] = {k: [] for k in ("obs", "next_obs", "action", "reward", "done")}
    starts = []
    for trajectory in tqdm(range(trajectories), desc="trajectories", unit="traj"):
        obs, _ = env.reset(seed=seed + trajectory)
        starts.append(len(columns["obs"]))
        for _ in range(max_steps):
            if rng.random() < sample_probability:
                action = algo.sample_action(obs[None, start:])[0]
            else:
                action = algo.predict(obs[None, start:])[0]
            next_obs, reward, terminated, truncated, _ = env.step(action)
            for key, value in zip(columns, (obs, next_obs, action, [reward], terminated)):
                columns[key].append(value)
            obs = next_obs
            if terminated or truncated:
                break
    data = {k: np.asarray(v, dtype=np.float32) for k, v in columns.items()}
    data["done"] = data["done"].astype(bool)[:, None]
    data["index"] = np.asarray(starts[1:], dtype=np.float32)  # NeoRL drops the leading 0
    return data


def dataset_file_name(task: str, level: str, count: int, split: str, seed: int = 0) -> str:
    """NeoRL's layout, ``Hopper-v5-low-99-train.npz``; a collection with another seed (a second
    draw of the same protocol) adds ``-seed<N>``, so its runs and rows stay apart."""
    return f"{task}-{level}-{count}-{split}" + (f"-seed{seed}" if seed else "") + ".npz"


def collect(config: CollectConfig, command: str = "") -> dict:
    """Run the whole protocol; returns (and writes to ``collect.json``) what was made."""
    folder = Path(config.out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if config.policies_dir is not None:
        _restore_policies(config, Path(config.policies_dir), folder)
    history = selection_returns(config, folder, train_behaviour_policies(config, folder))
    chosen = pick_policies(history, config.levels)
    if config.policies_dir is not None:
        _keep_policies(config, Path(config.policies_dir), folder, history, chosen)
    shared = _announce(chosen)
    task = config.env
    record_path = folder / "collect.json"
    made_before = _recorded_datasets(record_path)
    record = {
        "command": command,
        "config": dataclasses.asdict(config),
        "sac_checkpoints": history,
        "shared_checkpoints": {str(step): levels for step, levels in shared.items()},
        "datasets": {},
    }
    for level, checkpoint in chosen.items():
        # .d3 policies were written by this collector before lmencoders saved models safely
        algo = load_model(folder / checkpoint["path"], trust_pickle=True)
        for offset, (split, count) in enumerate(
            [("train", config.train_trajectories), ("val", config.val_trajectories)]
        ):
            name = dataset_file_name(task, level, count, split, config.seed)
            path = folder / name
            before = made_before.get(name, {})
            same_policy = (before.get("policy_step"), before.get("sample_probability")) == (
                checkpoint["step"],
                config.sample_probability,
            )
            made = before.get("made_on")
            if not (path.is_file() and same_policy):  # new, or made from another policy
                env = make_env(task)
                seed = config.seed + 1_000_000 * (1 + offset) + 100_000 * config.levels.index(level)
                data = rollout(
                    algo,
                    env,
                    trajectories=count,
                    max_steps=config.max_episode_steps,
                    sample_probability=config.sample_probability,
                    seed=seed,
                )
                atomic_write(path, lambda f, d=data: np.savez_compressed(f, **d))
                made = made_on()
            returns = read_neorl_file(path).returns()
            record["datasets"][name] = {
                "level": level,
                "policy_step": checkpoint["step"],
                "policy_return": checkpoint["return"],
                "policy_selection_return": checkpoint.get("selection_return"),
                "sample_probability": config.sample_probability,
                "trajectories": int(len(returns)),
                "mean_return": float(returns.mean()),
                "std_return": float(returns.std()),
                "made_on": made,  # another CPU or version rolls out other trajectories
            }
            print(
                f"{name}: {len(returns)} trajectories, return {returns.mean():.1f} "
                f"+- {returns.std():.1f} (policy at SAC step {checkpoint['step']})"
            )
            # kept after every file: a run that dies still says what each file came from
            _write_record(record_path, made_before | record["datasets"], record)
    record["seconds"] = time.perf_counter() - started
    _write_record(record_path, record["datasets"], record)
    return record


# the settings that decide which policies SAC trains and which are picked: kept policies are
# used only by a collection with the same ones
_POLICY_SETTINGS = (
    "env", "seed", "sac_steps", "checkpoint_every", "eval_episodes", "selection_episodes",
    "scale_observations", "sac_sees_positions", "stop_at_return",
)  # fmt: skip
_KEPT_SETTINGS = "collect-settings.json"


def _policy_settings(config: CollectConfig) -> dict:
    return {key: getattr(config, key) for key in _POLICY_SETTINGS}


def _keep_policies(
    config: CollectConfig, kept: Path, folder: Path, history: list[dict], chosen: dict[str, dict]
) -> None:
    """Each chosen level's policy (the policy network alone), the checkpoint list and the
    settings that made them, in ``kept``."""
    for checkpoint in chosen.values():
        target = kept / checkpoint["path"]
        if not (target / "model.pt").is_file():
            algo = load_model(folder / checkpoint["path"], trust_pickle=True)
            save_policy(algo, target)
    for name, value in [
        ("sac-checkpoints.json", history),
        (_KEPT_SETTINGS, _policy_settings(config)),
    ]:
        atomic_write(kept / name, lambda f, v=value: f.write(json.dumps(v, indent=1).encode()))


def _restore_policies(config: CollectConfig, kept: Path, folder: Path) -> None:
    """Start a collection from kept policies: SAC and the re-evaluation are done."""
    if (folder / "sac-checkpoints.json").is_file() or not (kept / _KEPT_SETTINGS).is_file():
        return
    settings = json.loads((kept / _KEPT_SETTINGS).read_text())
    differ = {k: (v, settings.get(k)) for k, v in _policy_settings(config).items()
              if settings.get(k) != v}  # fmt: skip
    if differ:
        detail = ", ".join(
            f"{k} {ours!r} (kept: {theirs!r})" for k, (ours, theirs) in differ.items()
        )
        raise ConfigError(
            f"{kept}: its policies were made with other settings: {detail}; collect with the "
            "kept settings, or into a new --policies folder"
        )
    folder.mkdir(parents=True, exist_ok=True)
    for policy in (kept / "policies").glob("*"):
        shutil.copytree(policy, folder / "policies" / policy.name, dirs_exist_ok=True)
    shutil.copy(kept / "sac-checkpoints.json", folder / "sac-checkpoints.json")
    print(f"SAC policies from {kept}: SAC is not trained again", flush=True)


def _recorded_datasets(path: Path) -> dict[str, dict]:
    """What an earlier run of the collector recorded of each file it made (nothing if none)."""
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text()).get("datasets", {}))
    except (ValueError, AttributeError):  # unreadable: every file is made again
        return {}


def _write_record(path: Path, datasets: dict[str, dict], record: dict) -> None:
    whole = record | {"datasets": datasets}
    atomic_write(path, lambda f: f.write(json.dumps(whole, indent=1).encode()))
