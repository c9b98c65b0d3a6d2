"""FinRL: 181 numbers per day read as text (chunked by ticker), TD3+BC on a trading dataset.

NeoRL's finance datasets can be loaded with ``lmencoders.datasets.load_neorl("finance", ...)``
when you have the files; this example makes a small dataset itself from a noisy momentum
trader on NeoRL's market file, then trains and evaluates on the same market.

    python examples/finrl.py --episodes 4 --steps 1000
"""

from __future__ import annotations

import argparse

import d3rlpy
import numpy as np

import lmencoders
from lmencoders.envs import FinRLEnv


def collect(env: FinRLEnv, episodes: int, seed: int) -> d3rlpy.dataset.MDPDataset:
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {k: [] for k in ("obs", "act", "rew", "term")}
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        done = False
        while not done:
            macd = obs[61:91]
            action = np.clip(np.tanh(macd) + rng.normal(0, 0.5, 30), -1, 1).astype(np.float32)
            next_obs, reward, done, _, _ = env.step(action)
            for key, value in zip(rows, (obs, action, reward, done)):
                rows[key].append(value)
            obs = next_obs
    return d3rlpy.dataset.MDPDataset(
        np.asarray(rows["obs"], np.float32),
        np.asarray(rows["act"]),
        np.asarray(rows["rew"], np.float32),
        np.asarray(rows["term"]),
        action_space=d3rlpy.ActionSpace.CONTINUOUS,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args()
    env = FinRLEnv()
    dataset = collect(env, args.episodes, seed=0)
    description = lmencoders.load_description("finrl")
    print("the LM reads:", description.format(dataset.episodes[0].observations[:1])[0][:200], "...")

    scaler = d3rlpy.preprocessing.StandardObservationScaler()
    factory = lmencoders.LMEncoderFactory(description="finrl", observation_scaler=scaler)
    factory.precompute(dataset)  # ~1,000 tokens per day: 5 chunks each, pooled
    algo = d3rlpy.algos.TD3PlusBCConfig(
        actor_encoder_factory=factory, critic_encoder_factory=factory, observation_scaler=scaler
    ).create(device="cpu")
    algo.fit(
        dataset,
        n_steps=args.steps,
        n_steps_per_epoch=args.steps,
        logger_adapter=d3rlpy.logging.NoopAdapterFactory(),
    )
    score = d3rlpy.metrics.evaluate_qlearning_with_environment(algo, env, n_trials=1)
    returns = [float(ep.rewards.sum()) for ep in dataset.episodes]
    print(
        f"dataset return {np.mean(returns):.1f}, trained policy {score:.1f} "
        f"(reward = change of total assets x 1e-4)"
    )


if __name__ == "__main__":
    main()
