"""A task lmencoders does not ship, described in YAML by its user: InvertedPendulum-v5.

No code is needed to describe an environment: one entry per observation dimension. This
example collects a small dataset with a noisy hand-written controller, trains TD3+BC with the
LM encoder and evaluates it.

    python examples/custom_environment.py --episodes 20 --steps 2000
"""

from __future__ import annotations

import argparse

import d3rlpy
import gymnasium as gym
import numpy as np

import lmencoders

DESCRIPTION = """
name: inverted-pendulum
summary: Gymnasium InvertedPendulum-v5, 4 dimensions
format: {decimals: 4}
dimensions:
  - {label: cart position, unit: m}
  - {label: pole angle, unit: rad}
  - {label: cart velocity, unit: m/s}
  - {label: pole angular velocity, unit: rad/s}
"""


def collect(episodes: int, seed: int) -> d3rlpy.dataset.MDPDataset:
    env = gym.make("InvertedPendulum-v5")
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {k: [] for k in ("obs", "act", "rew", "term", "timeout")}
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        for t in range(200):
            push = 2.0 * obs[1] + 0.3 * obs[3] + rng.normal(0, 0.5)  # a noisy balancing rule
            action = np.clip([push], -3, 3).astype(np.float32)
            next_obs, reward, terminated, _, _ = env.step(action)
            for key, value in zip(
                rows, (obs, action, reward, terminated, t == 199 and not terminated)
            ):
                rows[key].append(value)
            obs = next_obs
            if terminated:
                break
    return d3rlpy.dataset.MDPDataset(
        *(np.asarray(rows[k]) for k in rows), action_space=d3rlpy.ActionSpace.CONTINUOUS
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()

    description = lmencoders.load_description(DESCRIPTION)
    dataset = collect(args.episodes, seed=0)
    print("the LM reads:", description.format(dataset.episodes[0].observations[:1])[0])

    scaler = d3rlpy.preprocessing.StandardObservationScaler()
    factory = lmencoders.LMEncoderFactory(description=DESCRIPTION, observation_scaler=scaler)
    factory.precompute(dataset)
    algo = d3rlpy.algos.TD3PlusBCConfig(
        actor_encoder_factory=factory, critic_encoder_factory=factory, observation_scaler=scaler
    ).create(device="cpu")
    algo.fit(
        dataset,
        n_steps=args.steps,
        n_steps_per_epoch=args.steps,
        logger_adapter=d3rlpy.logging.NoopAdapterFactory(),
    )
    env = gym.make("InvertedPendulum-v5")
    score = d3rlpy.metrics.evaluate_qlearning_with_environment(algo, env, n_trials=3)
    returns = [float(ep.rewards.sum()) for ep in dataset.episodes]
    print(f"dataset return {np.mean(returns):.1f}, trained policy {score:.1f}")


if __name__ == "__main__":
    main()
