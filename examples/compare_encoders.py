"""TD3+BC with and without the language-model encoder, same data, same seeds.

python examples/compare_encoders.py --steps 3000 --seeds 0 1 2
"""

from __future__ import annotations

import argparse

import numpy as np

from lmencoders.train import TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="", help="NeoRL-layout .npz (default: shipped)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-episodes", type=int, default=5)
    args = parser.parse_args()

    for encoder in ("vector", "lm"):
        returns = []
        for seed in args.seeds:
            result = train(
                TrainConfig(
                    dataset=args.dataset,
                    encoder=encoder,
                    steps=args.steps,
                    seed=seed,
                    eval_episodes=args.eval_episodes,
                    out_dir="runs/compare",
                    tensorboard=False,
                )
            )
            returns.append(result["evaluation"]["mean_return"])
        print(
            f"TD3+BC, {encoder} encoder: {np.mean(returns):.1f} +- {np.std(returns):.1f} "
            f"over seeds {args.seeds}"
        )


if __name__ == "__main__":
    main()
