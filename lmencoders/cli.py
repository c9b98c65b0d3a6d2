"""``lmencoders`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .backbone import DEFAULT_MODEL, POOLINGS


def _precompute(args: argparse.Namespace) -> int:
    import torch

    from .cache import default_cache_dir
    from .datasets import read_observations
    from .features import precompute_features

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torchrun: one shard per process
        backend = "nccl" if args.device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend)
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    observations = read_observations(args.dataset)
    report = precompute_features(
        observations,
        args.description,
        model=args.model,
        pooling=args.pooling,
        max_length=args.max_length,
        batch_size=args.batch_size,
        device=args.device,
        cache_dir=args.cache_dir or default_cache_dir(),
    )
    if torch.distributed.is_initialized():
        rank = torch.distributed.get_rank()
        torch.distributed.destroy_process_group()
        if rank != 0:
            return 0
    rate = report.unique / report.seconds if report.source == "computed" else float("nan")
    print(
        f"{report.observations} observations, {report.unique} distinct: {report.source} in "
        f"{report.seconds:.1f} s ({rate:.1f} distinct obs/s)\ncache: {report.path}"
    )
    return 0


def _collect(args: argparse.Namespace) -> int:
    from .collect import CollectConfig, collect

    config = CollectConfig(
        env=args.env, out_dir=args.out, sac_steps=args.sac_steps,
        checkpoint_every=args.checkpoint_every, eval_episodes=args.eval_episodes,
        levels=tuple(args.levels), train_trajectories=args.train, val_trajectories=args.val,
        max_episode_steps=args.max_episode_steps, seed=args.seed,
    )
    record = collect(config)
    print(f"done in {record['seconds']:.0f} s; record: {Path(args.out) / 'collect.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmencoders", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    pre = commands.add_parser(
        "precompute",
        help="compute the frozen LM features of a dataset once and keep them on disk",
        description="Compute the frozen LM features of every distinct observation of a dataset "
        "(NeoRL .npz or d3rlpy .h5) and store them in the feature cache. Under torchrun, each "
        "process encodes a shard and rank 0 merges them into one cache file.",
    )
    pre.add_argument("dataset", help="NeoRL .npz (obs, next_obs) or d3rlpy .h5 file")
    pre.add_argument("--description", required=True, help="shipped name or YAML path")
    pre.add_argument("--model", default=DEFAULT_MODEL)
    pre.add_argument("--pooling", default="mean", choices=sorted(POOLINGS))
    pre.add_argument("--max-length", type=int, default=None)
    pre.add_argument("--batch-size", type=int, default=None, help="default: 16 on CPU, 256 on GPU")
    pre.add_argument("--device", default="cpu")
    pre.add_argument(
        "--cache-dir", default=None, help="default: $LMENCODERS_CACHE or ~/.cache/lmencoders"
    )
    pre.set_defaults(run=_precompute)

    col = commands.add_parser(
        "collect",
        help="make NeoRL-style datasets for a gymnasium environment (SAC behaviour policies)",
        description="Train SAC online, keep the policies at about 25/50/75%% of the best return "
        "(low/medium/high), roll them out (mean action 80%%, sampled 20%%) and write NeoRL-layout "
        ".npz files. Finished stages are skipped when run again.",
    )
    col.add_argument("--env", default="Hopper-v5", help="gymnasium id (default Hopper-v5)")
    col.add_argument("--out", default="neorl-data", help="output folder")
    col.add_argument("--sac-steps", type=int, default=100_000)
    col.add_argument("--checkpoint-every", type=int, default=5_000)
    col.add_argument("--eval-episodes", type=int, default=5)
    col.add_argument("--levels", nargs="+", default=["low", "medium", "high"],
                     choices=["low", "medium", "high"])
    col.add_argument("--train", type=int, default=100, help="train trajectories per level")
    col.add_argument("--val", type=int, default=10, help="val trajectories per level")
    col.add_argument("--max-episode-steps", type=int, default=1000)
    col.add_argument("--seed", type=int, default=0)
    col.set_defaults(run=_collect)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import LMEncodersError

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except LMEncodersError as exc:
        print(f"lmencoders {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
