"""Evaluation environments: MuJoCo in NeoRL's layout, NeoRL's FinRL trading task, and
normalised scores with NeoRL's reference returns."""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

import gymnasium as gym
import numpy as np
from tqdm.auto import tqdm

from .errors import ConfigError

__all__ = [
    "TASKS",
    "make_env",
    "kept_positions",
    "episode_returns",
    "description_for",
    "FinRLEnv",
    "default_market_file",
    "normalized_score",
    "FINRL_ID",
    "register_environments",
]

# task -> (gymnasium id or None, description name, NeoRL (random, expert) returns or None)
TASKS: dict[str, tuple[str | None, str, tuple[float, float] | None]] = {
    "Hopper-v3": ("Hopper-v5", "hopper", (5.0, 3294.0)),
    "Walker2d-v3": ("Walker2d-v5", "walker2d", (1.0, 5143.0)),
    "HalfCheetah-v3": ("HalfCheetah-v5", "halfcheetah", (-298.0, 12284.0)),
    "finance": (None, "finrl", None),
}


FINRL_ID = "lmencoders/FinRL-v0"


def make_env(task: str, **kwargs) -> gym.Env:
    """The evaluation environment of a NeoRL task name (``Hopper-v3``...), a gymnasium id, or
    ``minari:<dataset id>`` (the environment the Minari dataset was recorded in).

    MuJoCo tasks are gymnasium v5 with the x position kept in the observation, as NeoRL
    recorded them (``exclude_current_positions_from_observation=False``)."""
    if task == "finance":
        return FinRLEnv(**kwargs)
    if task.startswith("minari:"):
        from .datasets import minari_dataset

        return minari_dataset(task.removeprefix("minari:")).recover_environment()
    env_id = TASKS[task][0] if task in TASKS else task
    if kept_positions(env_id):
        kwargs.setdefault("exclude_current_positions_from_observation", False)
    return gym.make(env_id, **kwargs)


def kept_positions(task: str) -> int:
    """How many leading observation entries are positions that NeoRL's layout keeps and
    gymnasium's default leaves out (the x position of the MuJoCo locomotion tasks)."""
    env_id = TASKS[task][0] if task in TASKS else task
    return 1 if env_id and env_id.split("-")[0] in ("Hopper", "Walker2d", "HalfCheetah") else 0


def episode_returns(
    act: Callable[[np.ndarray], np.ndarray],
    envs: Sequence[gym.Env],
    seed: int = 0,
    show_progress: bool = False,
) -> list[float]:
    """Undiscounted return of one episode per environment (reset seeds ``seed``, ``seed + 1``...).

    The episodes run in lockstep and ``act`` maps a batch of observations to a batch of
    actions: an LM policy then encodes all live episodes in one forward pass per step. The
    progress bar counts lockstep steps (one policy call each)."""
    observations = [env.reset(seed=seed + i)[0] for i, env in enumerate(envs)]
    totals = [0.0] * len(envs)
    live = list(range(len(envs)))
    horizon = envs[0].spec.max_episode_steps if envs and envs[0].spec else None
    bar = tqdm(
        total=horizon,
        desc=f"evaluating {len(envs)} episodes",
        unit="step",
        disable=not show_progress,
    )
    while live:
        actions = act(np.stack([observations[i] for i in live]))
        still = []
        for i, action in zip(live, actions):
            observations[i], reward, terminated, truncated, _ = envs[i].step(action)
            totals[i] += float(reward)
            if not (terminated or truncated):
                still.append(i)
        live = still
        bar.update(1)
        bar.set_postfix(live=len(live))
    bar.close()
    return totals


def description_for(task: str, observation_size: int | None = None) -> str:
    """The shipped description of a task's observations: NeoRL's layout (x position kept),
    or gymnasium's default layout when ``observation_size`` says so (e.g. Minari data)."""
    if task in TASKS:
        return TASKS[task][1]
    if task.startswith("minari:"):
        from .datasets import minari_dataset

        spec = minari_dataset(task.removeprefix("minari:")).spec.env_spec
        if spec is None:
            raise ConfigError(f"{task} names no environment: pass description= explicitly")
        return description_for(spec.id, observation_size)
    family = task.split("-")[0].lower()
    if family in ("hopper", "walker2d", "halfcheetah"):
        from .description import load_description

        for name in (family, f"{family}-v5"):
            if observation_size in (None, load_description(name).size):
                return name
    raise ConfigError(f"no shipped description for {task!r}: pass description= explicitly")


def normalized_score(task: str, raw_return: float) -> float | None:
    """100 * (return - random) / (expert - random) with NeoRL's references, if it has them.

    Gymnasium v5 MuJoCo tasks use the references of NeoRL's v3 tasks (same robots; v5 fixes
    details of the simulation, so treat such scores as approximate)."""
    v3 = {gym_id: name for name, (gym_id, _, _) in TASKS.items() if gym_id}
    refs = TASKS.get(v3.get(task, task), (None, None, None))[2]
    if refs is None:
        return None
    random, expert = refs
    return 100.0 * (raw_return - random) / (expert - random)


def default_market_file() -> Path:
    """NeoRL's FinRL market data (``finance-trade.csv``, Apache-2.0), shipped with lmencoders."""
    return Path(str(resources.files("lmencoders") / "data" / "finance-trade.csv"))


class FinRLEnv(gym.Env):
    """NeoRL's FinRL stock trading task, replaying a market file day by day.

    Observation (181): cash, then close price, shares held, MACD, RSI-30, CCI-30 and DX-30 of
    each of the 30 tickers. Action (30) in [-1, 1], times ``hmax`` shares per ticker: sells are
    executed first (most negative first), then buys (largest first, limited to what the cash
    buys in whole-share multiples, as NeoRL does); trades cost ``cost`` of their value. Reward:
    change of total assets (cash + shares at close) times ``reward_scaling``. An episode runs to
    the last day of the file.
    """

    metadata = {"render_modes": []}
    indicators = ("macd", "rsi_30", "cci_30", "dx_30")

    def __init__(
        self,
        market_file: str | Path | None = None,
        hmax: float = 100.0,
        initial_amount: float = 1_000_000.0,
        cost: float = 0.001,
        reward_scaling: float = 1e-4,
    ) -> None:
        self.market_file = Path(market_file) if market_file else default_market_file()
        self.dates, self.tickers, self.close, self.features = self._read(self.market_file)
        self.n = len(self.tickers)
        self.hmax, self.initial_amount = hmax, initial_amount
        self.cost, self.reward_scaling = cost, reward_scaling
        size = 1 + 6 * self.n
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (size,), np.float64)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (self.n,), np.float32)
        self.day = 0
        self.cash = initial_amount
        self.shares = np.zeros(self.n)

    @staticmethod
    def _read(path: Path) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
        days: dict[str, list[dict]] = {}
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                days.setdefault(row["date"], []).append(row)
        dates = list(days)
        tickers = [r["tic"] for r in days[dates[0]]]
        for date in dates:
            if [r["tic"] for r in days[date]] != tickers:
                raise ValueError(f"{path}: day {date} does not list the tickers of {dates[0]}")
        close = np.array([[float(r["close"]) for r in days[d]] for d in dates])
        features = np.array(
            [[[float(r[k]) for r in days[d]] for k in FinRLEnv.indicators] for d in dates]
        )
        return dates, tickers, close, features

    def _observation(self) -> np.ndarray:
        return np.concatenate(
            [[self.cash], self.close[self.day], self.shares, self.features[self.day].reshape(-1)]
        )

    def total_assets(self) -> float:
        return float(self.cash + self.close[self.day] @ self.shares)

    def reset(
        self, *, seed: int | None = None, options: dict | None = None
    ) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.day, self.cash, self.shares = 0, self.initial_amount, np.zeros(self.n)
        return self._observation(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self.day >= len(self.dates) - 1:
            raise RuntimeError("the episode is over: call reset()")
        orders = np.clip(np.asarray(action, dtype=np.float64), -1, 1) * self.hmax
        begin = self.total_assets()
        price = self.close[self.day]
        order = np.argsort(orders, kind="stable")
        for i in order[: int((orders < 0).sum())]:  # sells, most negative first
            amount = min(-orders[i], self.shares[i])
            if amount > 0:
                self.cash += price[i] * amount * (1 - self.cost)
                self.shares[i] -= amount
        for i in order[::-1][: int((orders > 0).sum())]:  # buys, largest first
            amount = min(self.cash // price[i], orders[i])
            self.cash -= price[i] * amount * (1 + self.cost)
            self.shares[i] += amount
        self.day += 1
        reward = (self.total_assets() - begin) * self.reward_scaling
        terminated = self.day >= len(self.dates) - 1
        return self._observation(), reward, terminated, False, {"total_assets": self.total_assets()}


def register_environments() -> None:
    """Make ``gymnasium.make("lmencoders/FinRL-v0")`` work (once per process)."""
    if FINRL_ID not in gym.registry:
        gym.register(FINRL_ID, entry_point=FinRLEnv)
