"""``lmencoders`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

from .backbone import DEFAULT_MODEL, POOLINGS, TUNING_MODES


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
        env=args.env,
        out_dir=args.out,
        sac_steps=args.sac_steps,
        checkpoint_every=args.checkpoint_every,
        eval_episodes=args.eval_episodes,
        levels=tuple(args.levels),
        train_trajectories=args.train,
        val_trajectories=args.val,
        max_episode_steps=args.max_episode_steps,
        scale_observations=args.scale_observations,
        seed=args.seed,
    )
    record = collect(config, command="lmencoders " + shlex.join(args.argv))
    print(f"done in {record['seconds']:.0f} s; record: {Path(args.out) / 'collect.json'}")
    return 0


def _describe(args: argparse.Namespace) -> int:
    import numpy as np

    from .backbone import language_model
    from .datasets import read_observations
    from .description import load_description
    from .envs import make_env

    description = load_description(args.description)
    if args.dataset:
        observations = read_observations(args.dataset)[: args.rows]
    else:
        env = make_env(args.env)
        first, _ = env.reset(seed=args.seed)
        observations = np.asarray([first])
    tokenizer = language_model(args.model).tokenizer
    for text in description.format(observations):
        count = len(tokenizer(text)["input_ids"])
        print(f"{text}\n({count} tokens with {args.model})")
    return 0


def _train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    result = train(
        TrainConfig(
            dataset=args.dataset or "",
            train_num=args.train_num,
            algo=args.algo,
            encoder=args.encoder,
            tuning=args.tuning,
            model=args.model,
            description=args.description,
            env=args.env,
            steps=args.steps,
            eval_every=args.eval_every,
            eval_episodes=args.eval_episodes,
            batch_size=args.batch_size,
            seed=args.seed,
            device=args.device,
            out_dir=args.out,
            tensorboard=not args.no_tensorboard,
        )
    )
    config = result["config"]
    print(
        f"dataset {Path(config['dataset']).name}: {result['dataset_trajectories']} trajectories, "
        f"mean return {result['dataset_mean_return']:.1f}\n"
        f"trained {config['algo']} ({config['encoder']} encoder"
        + (f", {config['tuning']} LM" if config["encoder"] == "lm" else "")
        + f") for {config['steps']} steps in {result['train_seconds']:.0f} s"
    )
    print(_evaluation_line(result["evaluation"]))
    print(f"model: {result['model']}")
    return 0


def _evaluation_line(evaluation: dict) -> str:
    score = evaluation["normalized_score"]
    normalized = f", normalised score {score:.1f}" if score is not None else ""
    return (
        f"evaluated return on {evaluation['env']} over {evaluation['episodes']} episodes: "
        f"{evaluation['mean_return']:.1f} +- {evaluation['std_return']:.1f}{normalized}"
    )


def _evaluate(args: argparse.Namespace) -> int:
    import d3rlpy

    from .train import evaluate

    algo = d3rlpy.load_learnable(args.model_file, device=args.device)
    print(_evaluation_line(evaluate(algo, args.env, args.episodes, args.seed)))
    return 0


def _experiment(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from .experiments import ExperimentConfig, run_experiment
    from .files import atomic_write

    config = ExperimentConfig(
        datasets=args.datasets,
        methods=args.methods,
        seeds=args.seeds,
        train_num=args.train_num,
        steps=args.steps,
        eval_every=args.eval_every,
        eval_episodes=args.eval_episodes,
        batch_size=args.batch_size,
        lm_batch_size=args.lm_batch_size,
        model=args.model,
        device=args.device,
        out_dir=args.out,
        time_budget=args.time_budget,
    )
    log = Path(args.out) / "experiment.json"
    history = json.loads(log.read_text()) if log.is_file() else []
    command = "lmencoders " + shlex.join(args.argv)
    history.append({"command": command, "config": dataclasses.asdict(config)})
    atomic_write(log, lambda f: f.write(json.dumps(history, indent=1).encode()))
    counts = run_experiment(config)
    print(
        f"runs done {counts['done']}, already finished {counts['skipped']}, "
        f"left for a later part {counts['left']}"
    )
    return 0


def _report(args: argparse.Namespace) -> int:
    from .experiments import write_results

    notes = Path(args.notes).read_text() if args.notes else ""
    print(write_results(args.out, args.results, notes))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmencoders", description=__doc__)
    parser.add_argument("--verbose", action="store_true", help="show d3rlpy's log lines")
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
    col.add_argument(
        "--levels", nargs="+", default=["low", "medium", "high"], choices=["low", "medium", "high"]
    )
    col.add_argument("--train", type=int, default=100, help="train trajectories per level")
    col.add_argument("--val", type=int, default=10, help="val trajectories per level")
    col.add_argument("--max-episode-steps", type=int, default=1000)
    col.add_argument(
        "--scale-observations",
        action="store_true",
        help="standardise SAC's inputs with statistics of random-action rollouts (FinRL)",
    )
    col.add_argument("--seed", type=int, default=0)
    col.set_defaults(run=_collect, argv=None)

    des = commands.add_parser(
        "describe", help="print the text an observation becomes, and its token count"
    )
    des.add_argument("--description", required=True, help="shipped name or YAML path")
    des.add_argument("--dataset", help="take observations from this .npz/.h5 file")
    des.add_argument("--rows", type=int, default=1, help="how many dataset rows")
    des.add_argument("--env", default="Hopper-v5", help="else: the first observation of this env")
    des.add_argument("--model", default=DEFAULT_MODEL, help="tokenizer that counts tokens")
    des.add_argument("--seed", type=int, default=0)
    des.set_defaults(run=_describe)

    from .train import ALGORITHMS

    tra = commands.add_parser(
        "train",
        help="train an offline RL agent on a NeoRL-layout dataset and evaluate it",
        description="Train with d3rlpy (file and tensorboard logs under --out), save the model, "
        "evaluate it in its environment. Defaults: TD3+BC with the frozen MiniLM encoder on the "
        "Hopper-v5 'low' dataset that ships with lmencoders.",
    )
    tra.add_argument("--dataset", help="NeoRL-layout .npz (default: the shipped Hopper dataset)")
    tra.add_argument("--train-num", type=int, help="keep only the first trajectories")
    tra.add_argument("--algo", default="td3+bc", choices=sorted(ALGORITHMS))
    tra.add_argument("--encoder", default="lm", choices=["lm", "vector"])
    tra.add_argument("--tuning", default="frozen", choices=sorted(TUNING_MODES))
    tra.add_argument("--model", default=DEFAULT_MODEL)
    tra.add_argument("--description", help="default: the task's shipped description")
    tra.add_argument("--env", help="evaluation env (default: from the dataset file name)")
    tra.add_argument("--steps", type=int, default=5_000)
    tra.add_argument("--eval-every", type=int, default=0, help="steps between evaluations")
    tra.add_argument("--eval-episodes", type=int, default=5)
    tra.add_argument("--batch-size", type=int, default=256)
    tra.add_argument("--seed", type=int, default=0)
    tra.add_argument("--device", default="cpu")
    tra.add_argument("--out", default="runs", help="logs, model.d3 and result.json go here")
    tra.add_argument("--no-tensorboard", action="store_true")
    tra.set_defaults(run=_train)

    eva = commands.add_parser("evaluate", help="evaluate a saved model in its environment")
    eva.add_argument("model_file", help="a .d3 file (d3rlpy.load_learnable)")
    eva.add_argument("--env", required=True, help="NeoRL task or gymnasium id, e.g. Hopper-v5")
    eva.add_argument("--episodes", type=int, default=10)
    eva.add_argument("--seed", type=int, default=0)
    eva.add_argument("--device", default="cpu")
    eva.set_defaults(run=_evaluate)

    from .experiments import METHODS

    exp = commands.add_parser(
        "experiment",
        help="run the paper's grid (datasets x methods x seeds), resumable",
        description="Runs every (dataset, method, seed) whose result is missing; finished runs "
        "are skipped, so the grid can be done in parts (--time-budget).",
    )
    exp.add_argument("--datasets", nargs="+", required=True, help="NeoRL-layout .npz files")
    exp.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    exp.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    exp.add_argument("--train-num", type=int, help="keep the first trajectories (99 as NeoRL v1)")
    exp.add_argument("--steps", type=int, default=5_000)
    exp.add_argument("--eval-every", type=int, default=1_000)
    exp.add_argument("--eval-episodes", type=int, default=5)
    exp.add_argument("--batch-size", type=int, default=256)
    exp.add_argument("--lm-batch-size", type=int, help="batch for tuned-LM runs")
    exp.add_argument("--model", default=DEFAULT_MODEL)
    exp.add_argument("--device", default="cpu")
    exp.add_argument("--out", default="experiments")
    exp.add_argument("--time-budget", type=float, help="seconds; no new run starts after it")
    exp.set_defaults(run=_experiment, argv=None)

    rep = commands.add_parser(
        "report", help="results table, CSV and learning curves from an experiment folder"
    )
    rep.add_argument("--out", default="experiments", help="the experiment folder")
    rep.add_argument("--results", default="RESULTS.md", help="Markdown file to write")
    rep.add_argument("--notes", help="a Markdown file of comments to include")
    rep.set_defaults(run=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import LMEncodersError

    args = build_parser().parse_args(argv)
    if getattr(args, "argv", "missing") is None:
        args.argv = list(argv) if argv is not None else sys.argv[1:]
    if not args.verbose:  # d3rlpy logs every config and epoch through structlog
        import structlog

        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    try:
        return args.run(args)
    except LMEncodersError as exc:
        print(f"lmencoders {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
