"""Quickstart: TD3+BC on Hopper with observations read as text by a frozen MiniLM.

1. Roll out a small Hopper-v5 dataset in NeoRL's layout (x position included) with a noisy
   hand-made gait, so that the data holds some forward progress.
2. Precompute the frozen LM features of every observation once (progress bar).
3. Train TD3+BC with the LM encoder as actor and critic encoder, save it in the safe format
   (JSON config + weights-only state dict), reload it with ``lmencoders.load_model`` and
   evaluate the reloaded policy in the simulator.

    python examples/quickstart.py            # about 2-3 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import time

import d3rlpy
import gymnasium as gym
import numpy as np

import lmencoders


def make_env() -> gym.Env:
    return gym.make("Hopper-v5", exclude_current_positions_from_observation=False)


def collect(episodes: int, max_steps: int, seed: int) -> d3rlpy.dataset.MDPDataset:
    """A periodic gait plus noise: crude, but it moves, unlike uniform random actions."""
    env = make_env()
    rng = np.random.default_rng(seed)
    columns: dict[str, list] = {k: [] for k in ("obs", "act", "rew", "term", "timeout")}
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        phase = rng.uniform(0, 2 * np.pi)
        for t in range(max_steps):
            gait = np.sin(0.35 * t + phase + np.array([0.0, 1.5, 3.0]))
            action = np.clip(0.6 * gait + rng.normal(0, 0.3, 3), -1, 1).astype(np.float32)
            next_obs, reward, terminated, truncated, _ = env.step(action)
            columns["obs"].append(obs)
            columns["act"].append(action)
            columns["rew"].append(reward)
            columns["term"].append(terminated)
            columns["timeout"].append((truncated or t == max_steps - 1) and not terminated)
            obs = next_obs
            if terminated or truncated:
                break
    return d3rlpy.dataset.MDPDataset(
        np.asarray(columns["obs"], np.float32),
        np.asarray(columns["act"]),
        np.asarray(columns["rew"], np.float32),
        np.asarray(columns["term"]),
        np.asarray(columns["timeout"]),
        action_space=d3rlpy.ActionSpace.CONTINUOUS,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--steps", type=int, default=2000, help="TD3+BC gradient steps")
    parser.add_argument("--eval-episodes", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tuning", default="frozen", choices=sorted(lmencoders.TUNING_MODES))
    parser.add_argument("--out", default="quickstart-model", help="folder for the model")
    args = parser.parse_args()

    d3rlpy.seed(args.seed)
    dataset = collect(args.episodes, args.max_steps, args.seed)
    returns = [float(ep.rewards.sum()) for ep in dataset.episodes]
    print(
        f"dataset: {len(returns)} episodes, {dataset.transition_count} transitions, "
        f"mean return {np.mean(returns):.1f}"
    )

    # The encoders unscale observations with the algorithm's own scaler, so the LM reads
    # physical values; the factory needs no scaler of its own.
    factory = lmencoders.LMEncoderFactory(description="hopper", tuning=args.tuning)
    first_text = factory.load_description().format(dataset.episodes[0].observations[:1])[0]
    print("example text:", first_text)
    if args.tuning == "frozen":
        report = factory.precompute(dataset)
        print(
            f"LM features of {report.unique} distinct observations: {report.source} "
            f"in {report.seconds:.1f} s ({report.path})"
        )

    algo = d3rlpy.algos.TD3PlusBCConfig(
        actor_encoder_factory=factory,
        critic_encoder_factory=factory,
        observation_scaler=d3rlpy.preprocessing.StandardObservationScaler(),
    ).create(device="cpu")
    start = time.perf_counter()
    algo.fit(
        dataset,
        n_steps=args.steps,
        n_steps_per_epoch=max(args.steps // 4, 1),
        save_interval=10**9,
        logger_adapter=d3rlpy.logging.NoopAdapterFactory(),
    )
    print(f"trained {args.steps} TD3+BC steps in {time.perf_counter() - start:.1f} s")

    lmencoders.save_model(algo, args.out)  # model.json + model.pt: loading runs no code
    reloaded = lmencoders.load_model(args.out)
    env = make_env()
    scores = [
        d3rlpy.metrics.evaluate_qlearning_with_environment(reloaded, env, n_trials=1)
        for _ in range(args.eval_episodes)
    ]
    print(
        f"evaluated return of the reloaded policy over {args.eval_episodes} episodes: "
        f"{np.mean(scores):.1f} +- {np.std(scores):.1f} (dataset mean {np.mean(returns):.1f})"
    )


if __name__ == "__main__":
    main()
