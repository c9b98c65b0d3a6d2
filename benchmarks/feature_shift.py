"""How far outside its data a learned policy's states lie, as the networks see them.

TD3+BC LM-Standardized standardises each frozen LM feature column with its dataset mean and
std, as d3rlpy does for observations; on HalfCheetah and FinRL it ended below TD3+BC on every
seed. results/notes.md's hypothesis: the columns vary so little over the data (std ~0.012) that
standardising multiplies them ~80x, and with them the feature changes that states outside the
data bring. This measures it: a trained policy is rolled out, and the states it visits are
scored in the z-units the critic reads, for the standardised observations (the policy's own
fitted d3rlpy scaler) and for the standardised LM features, next to the same scores of the
data's own states. If the LM columns put the visited states much further out than the
observations do, the critic meets larger out-of-data inputs with the LM than without.

    python benchmarks/feature_shift.py --dataset data/grid/Hopper-v5/Hopper-v5-low-99-train.npz \\
        --policy experiments/grid/runs/<a TD3+BC run> --env Hopper-v5 --description hopper

Reads the frozen features from the disk cache the grid's precompute leaves (the LM encodes
only the visited states that are not in the data); prints a Markdown table.
"""

from __future__ import annotations

import argparse

import numpy as np
from d3rlpy.base import LearnableBase

from lmencoders.backbone import DEFAULT_MODEL
from lmencoders.cache import default_cache_dir
from lmencoders.datasets import load_dataset
from lmencoders.description import load_description
from lmencoders.envs import make_env
from lmencoders.features import (
    STD_EPSILON,
    feature_statistics,
    frozen_features,
    precompute_features,
)
from lmencoders.saving import load_model


def visited_states(algo: LearnableBase, env_name: str, episodes: int, seed: int) -> np.ndarray:
    """Every observation the policy meets in ``episodes`` episodes (deterministic actions)."""
    env = make_env(env_name)
    states = []
    for episode in range(episodes):
        observation, _ = env.reset(seed=seed + episode)
        done = False
        while not done:
            states.append(observation)
            action = algo.predict(observation[None].astype(np.float32))[0]
            observation, _, terminated, truncated, _ = env.step(action)
            done = terminated or truncated
    return np.asarray(states, dtype=np.float32)


def z_summary(z: np.ndarray) -> dict[str, float]:
    """Per state, the largest |z| over the columns and the root-mean-square z; summarised."""
    largest = np.abs(z).max(axis=1)
    rms = np.sqrt(np.square(z).mean(axis=1))
    return {
        "median max |z|": float(np.median(largest)),
        "p95 max |z|": float(np.percentile(largest, 95)),
        "states with a |z| > 10": float((largest > 10).mean()),
        "median rms z": float(np.median(rms)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--policy", required=True, help="a run folder or model.json")
    parser.add_argument("--env", required=True)
    parser.add_argument("--description", required=True)
    parser.add_argument("--episodes", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-sample", type=int, default=2000, help="data states to score")
    args = parser.parse_args()

    description = load_description(args.description)
    # the rows the grid's precompute encoded, so its cache file is found
    seen = load_dataset(args.dataset).observations()
    precompute_features(seen, description, cache_dir=default_cache_dir())
    table = frozen_features(DEFAULT_MODEL, description)  # the table LM-Standardized reads
    statistics = feature_statistics(table, seen)

    algo = load_model(args.policy)
    scaler = algo.observation_scaler  # fitted on the policy's training data when it trained
    if scaler is None or not scaler.built:
        parser.error(f"--policy {args.policy}: its model has no fitted observation scaler")
    visited = visited_states(algo, args.env, args.episodes, args.seed)
    sample = np.random.default_rng(args.seed).choice(len(seen), args.data_sample, False)
    rows = []
    for name, states in [("data", seen[sample]), ("policy", visited)]:
        features = table(states)
        rows.append((name, "observations", z_summary(scaler.transform_numpy(states))))
        rows.append((name, "LM features", z_summary((features - statistics.mean) / statistics.std)))
    keys = list(rows[0][2])
    print(
        f"{len(visited)} policy states ({args.episodes} episodes), {args.data_sample} data "
        f"states; feature std: mean {float((statistics.std - STD_EPSILON).mean()):.4f} per column\n"
    )
    print("| states | inputs | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for name, inputs, summary in rows:
        print(f"| {name} | {inputs} | " + " | ".join(f"{summary[k]:.3g}" for k in keys) + " |")


if __name__ == "__main__":
    main()
