"""The same LM encoder under other offline algorithms: BC, CQL, BCQ, PLAS (and IQL, AWAC).

python examples/baselines.py --steps 1000
"""

from __future__ import annotations

import argparse

from lmencoders.train import TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algos", nargs="+", default=["bc", "cql", "bcq", "plas"])
    parser.add_argument("--encoder", default="lm", choices=["lm", "vector"])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--eval-episodes", type=int, default=3)
    args = parser.parse_args()
    for algo in args.algos:
        result = train(
            TrainConfig(
                algo=algo,
                encoder=args.encoder,
                steps=args.steps,
                eval_episodes=args.eval_episodes,
                out_dir="runs/baselines",
                tensorboard=False,
            )
        )
        evaluation = result["evaluation"]
        print(
            f"{algo:6s} with {args.encoder} encoders: return {evaluation['mean_return']:.1f} "
            f"+- {evaluation['std_return']:.1f} ({result['train_seconds']:.0f} s)"
        )


if __name__ == "__main__":
    main()
