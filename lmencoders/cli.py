"""``lmencoders`` command line.

Every command's options come from its config dataclass (:mod:`lmencoders.options`), so a
setting, its default, its help and its checks are written once.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .backbone import ALLOW_DOWNLOAD, DEFAULT_MODEL, PIECE_POOLING, POOLING_NAMES, PRECISIONS
from .checks import optional_positive, positive
from .options import add_options, from_args, option

if TYPE_CHECKING:  # the CLI imports torch-heavy modules only in the command that needs them
    from .experiments import ExperimentConfig


@dataclasses.dataclass
class PrecomputeConfig:
    dataset: str = option(
        help="NeoRL .npz, d3rlpy .h5 or minari:<dataset id>", positional=True, metavar="DATASET"
    )
    description: str | None = option(
        None, "shipped description name or YAML path (default: the task's)"
    )
    train_num: int | None = option(None, "keep only the first trajectories (as train does)")
    model: str = option(DEFAULT_MODEL, "Hugging Face name or local directory of the LM")
    pooling: str = option("mean", "how token states become features", choices=sorted(POOLING_NAMES))
    also_pooling: str | None = option(
        None,
        "also cache this pooling's features from the same LM pass ('segments' with 'mean', or "
        "the reverse)",
        choices=["mean", PIECE_POOLING],
    )
    max_length: int | None = option(None, "token window (default: the model's)")
    batch_size: int | None = option(None, "texts per LM forward (default: 16 on CPU, 256 on GPU)")
    device: str = option("cpu", "torch device")
    cache_dir: str | None = option(
        None, "feature cache folder (default: $LMENCODERS_CACHE or ~/.cache/lmencoders)"
    )
    precision: str = option(
        "float32",
        "the LM's forward: float32, or bfloat16 autocast (GPUs, CPUs with bf16 units)",
        choices=PRECISIONS,
    )

    def __post_init__(self) -> None:
        for name in ("train_num", "max_length", "batch_size"):
            setattr(self, name, optional_positive(getattr(self, name), name))


@dataclasses.dataclass
class DescribeConfig:
    description: str | None = option(
        None, "shipped description name or YAML path (default: the task's)"
    )
    dataset: str | None = option(None, "take observations from this dataset")
    rows: int = option(1, "how many dataset rows to show")
    env: str = option("Hopper-v5", "without --dataset: show the first observation of this env")
    model: str = option(DEFAULT_MODEL, "the LM whose tokenizer counts tokens")
    seed: int = option(0, "reset seed of --env")

    def __post_init__(self) -> None:
        self.rows = positive(self.rows, "rows")


@dataclasses.dataclass
class EvaluateConfig:
    model_file: str = option(
        help="a run folder, or its model.pt / model.json (a .d3 needs --trust-pickle)",
        positional=True,
        metavar="MODEL",
    )
    env: str | None = option(None, "environment (default: the one in the run's result.json)")
    episodes: int = option(10, "evaluation episodes")
    seed: int = option(0, "reset seed of the first episode")
    device: str = option("cpu", "torch device")
    trust_pickle: bool = option(
        False, "load a d3rlpy .d3 file (a pickle: it can run code; only for your own files)"
    )

    def __post_init__(self) -> None:
        self.episodes = positive(self.episodes, "episodes")


@dataclasses.dataclass
class ExplainConfig:
    model_file: str = option(
        help="a run folder, or its model.pt / model.json", positional=True, metavar="MODEL"
    )
    dataset: str = option(help="observations to average over (NeoRL .npz, .h5, minari:<id>)")
    rows: int = option(64, "observations drawn from the dataset")
    out: str | None = option(None, "PNG to write (default: explain.png in the run folder)")
    seed: int = option(0, "which observations are drawn")

    def __post_init__(self) -> None:
        self.rows = positive(self.rows, "rows")


@dataclasses.dataclass
class AttentionConfig:
    models: list[str] = option(
        help="LM Decision Transformer folders (model.json + model.pt), one row each",
        positional=True,
        metavar="MODEL",
    )
    dataset: str = option(help="where the window comes from (NeoRL .npz, .h5, minari:<id>)")
    trajectory: int = option(0, "which trajectory of the dataset")
    start: int = option(0, "first step of the window (context_size steps long)")
    out: str = option("attention.png", "PNG to write")


@dataclasses.dataclass
class ReportConfig:
    out: str = option("experiments", "the experiment folder")
    results: str = option("RESULTS.md", "Markdown file to write")
    notes: str | None = option(None, "a Markdown file of comments to include")
    sections: list[str] = option(
        [], "generated Markdown reports to include as sections (e.g. a benchmark's RESULTS.md)"
    )
    sections_only: bool = option(
        False, "only refresh the --sections blocks of the existing RESULTS.md; read no runs"
    )
    ledger: str | None = option(
        None, "a folder (commit it) that keeps every finished run's record; reports all of them"
    )


def _precompute(args: argparse.Namespace) -> int:
    import torch

    from .cache import default_cache_dir
    from .datasets import load_dataset
    from .envs import description_for
    from .features import precompute_features

    config = from_args(PrecomputeConfig, args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torchrun: one shard per process
        backend = "nccl" if config.device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend)
        if config.device.startswith("cuda"):
            config.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    dataset = load_dataset(config.dataset, config.train_num)
    observations = dataset.observations()
    description = config.description or description_for(dataset.env or "", observations.shape[1])
    report = precompute_features(
        observations,
        description,
        model=config.model,
        pooling=config.pooling,
        max_length=config.max_length,
        batch_size=config.batch_size,
        device=config.device,
        cache_dir=config.cache_dir or default_cache_dir(),
        precision=config.precision,
        also_pooling=config.also_pooling,
    )
    if torch.distributed.is_initialized():
        rank = torch.distributed.get_rank()
        torch.distributed.destroy_process_group()
        if rank != 0:
            return 0
    rate = ""  # a rate of reading the cache file would say nothing about the LM
    if report.source == "computed":
        rate = f" ({report.unique / max(report.seconds, 1e-9):.1f} distinct obs/s)"
    print(
        f"{report.observations} observations, {report.unique} distinct: {report.source} in "
        f"{report.seconds:.1f} s{rate}\ncache: {report.path}"
    )
    return 0


def _collect(args: argparse.Namespace) -> int:
    from .collect import CollectConfig, collect

    config = from_args(CollectConfig, args)
    record = collect(config, command=args.invocation)
    print(f"done in {record['seconds']:.0f} s; record: {Path(config.out_dir) / 'collect.json'}")
    return 0


def _describe(args: argparse.Namespace) -> int:
    import numpy as np

    from .backbone import language_model
    from .datasets import load_dataset
    from .description import load_description
    from .envs import description_for, make_env

    config = from_args(DescribeConfig, args)
    if config.dataset:
        dataset = load_dataset(config.dataset)
        observations = dataset.observations()[: config.rows]
        task = dataset.env or ""
    else:
        first, _ = make_env(config.env).reset(seed=config.seed)
        observations, task = np.asarray([first]), config.env
    description = load_description(
        config.description or description_for(task, observations.shape[1])
    )
    tokenizer = language_model(config.model).tokenizer
    for text in description.format(observations):
        count = len(tokenizer(text)["input_ids"])
        print(f"{text}\n({count} tokens with {config.model})")
    return 0


def _train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    result = train(from_args(TrainConfig, args), command=args.invocation)
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
    from .train import evaluation_text

    return "evaluated " + evaluation_text(evaluation)


def _evaluate(args: argparse.Namespace) -> int:
    import json

    from .encoders import LMEncoderFactory
    from .errors import ConfigError
    from .saving import load_model
    from .train import evaluate, evaluation_cost

    config = from_args(EvaluateConfig, args)
    path = Path(config.model_file)
    env = config.env
    if env is None:
        record = (path if path.is_dir() else path.parent) / "result.json"
        if not record.is_file():
            raise ConfigError(f"{path}: no result.json beside it to name the environment: --env")
        env = json.loads(record.read_text())["evaluation"]["env"]
    algo = load_model(path, config.device, trust_pickle=config.trust_pickle)
    factories = [getattr(algo.config, f.name) for f in dataclasses.fields(algo.config)]
    encoder = "lm" if any(isinstance(f, LMEncoderFactory) for f in factories) else "vector"
    print(evaluation_cost(env, config.episodes, encoder), flush=True)
    print(_evaluation_line(evaluate(algo, env, config.episodes, config.seed)))
    return 0


def _experiment(args: argparse.Namespace) -> int:
    import json

    from .experiments import ExperimentConfig, run_experiment
    from .files import atomic_write, hold_file

    config = from_args(ExperimentConfig, args)
    if config.dry_run:
        return _experiment_plan(config)
    log = Path(config.out_dir) / "experiment.json"
    command = args.invocation
    with hold_file(log.with_name(log.name + ".lock")):  # two lanes starting at once keep both
        history = json.loads(log.read_text()) if log.is_file() else []
        history.append({"command": command, "config": dataclasses.asdict(config)})
        atomic_write(log, lambda f: f.write(json.dumps(history, indent=1).encode()))
    counts = run_experiment(config, command)
    print(
        f"runs done {counts['done']}, already finished {counts['skipped']}, "
        f"running in another process {counts['running']}, left for a later part {counts['left']}"
    )
    return 0


def _experiment_plan(config: ExperimentConfig) -> int:
    """``experiment --dry-run``: where each run stands; nothing runs, nothing is logged."""
    from .experiments import plan_experiment

    counts = dict.fromkeys(["finished", "running", "to continue", "to start"], 0)
    for dataset, method, seed, (state, step) in plan_experiment(config):
        counts[state] += 1
        where = f" (step {step})" if step else ""
        print(f"{state}{where}: [{method}] {Path(dataset).name} seed {seed}")
    print(", ".join(f"{state} {count}" for state, count in counts.items()))
    return 0


def _explain(args: argparse.Namespace) -> int:
    from .explain import draw, explain, format_table

    config = from_args(ExplainConfig, args)
    explanation = explain(config.model_file, config.dataset, rows=config.rows, seed=config.seed)
    path = Path(config.model_file)
    folder = path if path.is_dir() else path.parent
    png = draw(explanation, config.out or folder / "explain.png")
    print(f"{explanation.run}: {explanation.method}, {explanation.observations} observations")
    print(format_table(explanation))
    print(f"picture: {png}")
    return 0


def _relabel(args: argparse.Namespace) -> int:
    from .relabel import RelabelConfig, relabel

    config = from_args(RelabelConfig, args)
    record = relabel(config, command=args.invocation)
    counts = ", ".join(f"{answer} {n}" for answer, n in sorted(record["counts"].items()))
    print(
        f"{record['spans']} outcomes judged by {config.judge} ({record['verdicts_from_cache']} "
        f"from the cache) in {record['seconds']:.0f} s: {counts}\n"
        f"relabelled dataset: {record['output']} (record beside it, .json)"
    )
    return 0


def _attention(args: argparse.Namespace) -> int:
    from .attention import attention_maps, draw_attention

    config = from_args(AttentionConfig, args)
    maps = [
        attention_maps(m, config.dataset, trajectory=config.trajectory, start=config.start)
        for m in config.models
    ]
    print(f"picture: {draw_attention(maps, config.out)}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import write_results
    from .sections import place_sections

    config = from_args(ReportConfig, args)
    if config.sections_only:
        results = Path(config.results)
        if not results.is_file():
            raise FileNotFoundError(f"--sections-only: no {results} to refresh (report without it)")
        results.write_text(place_sections(results.read_text(), config.sections, results))
        print(f"refreshed {len(config.sections)} section(s) of {results}")
        return 0
    notes = Path(config.notes).read_text() if config.notes else ""
    print(write_results(config.out, config.results, notes, config.sections, config.ledger))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .collect import CollectConfig
    from .experiments import ExperimentConfig
    from .relabel import RelabelConfig
    from .train import TrainConfig

    parser = argparse.ArgumentParser(
        prog="lmencoders", description="Offline RL that reads observations as text (d3rlpy + LMs)."
    )
    parser.add_argument("--verbose", action="store_true", help="show d3rlpy's log lines")
    parser.add_argument(
        "--allow-download",
        action="store_true",
        help=f"let a Hugging Face model be downloaded if not cached (or {ALLOW_DOWNLOAD}=1)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def command(
        name: str,
        config: type,
        run: Callable[[argparse.Namespace], int],
        help: str,
        description: str = "",
    ) -> None:
        sub = commands.add_parser(name, help=help, description=description or help)
        add_options(sub, config)
        sub.set_defaults(run=run)

    command(
        "precompute",
        PrecomputeConfig,
        _precompute,
        "compute the frozen LM features of a dataset once and keep them on disk",
        "Compute the frozen LM features of every distinct observation of a dataset (the same "
        "rows train meets, so train then reads them from the cache) and store them in the "
        "feature cache. Under torchrun, each process encodes a shard and rank 0 merges them.",
    )
    command(
        "collect",
        CollectConfig,
        _collect,
        "make NeoRL-style datasets for a gymnasium environment (SAC behaviour policies)",
        "Train SAC online, keep the policies at about 25/50/75% of the best return "
        "(low/medium/high), roll them out (mean action 80%, sampled 20%) and write NeoRL-layout "
        ".npz files. Finished stages are skipped when run again.",
    )
    command(
        "describe",
        DescribeConfig,
        _describe,
        "print the text an observation becomes, and its token count",
    )
    command(
        "train",
        TrainConfig,
        _train,
        "train an offline RL agent and evaluate it",
        "Train with d3rlpy (logs, model.json + model.pt and result.json in a fresh run folder "
        "under --out; earlier runs are never touched), saving the model before evaluating it. "
        "Defaults: TD3+BC with the frozen MiniLM encoder on the Hopper-v5 data that ships "
        "with lmencoders.",
    )
    command(
        "evaluate",
        EvaluateConfig,
        _evaluate,
        "evaluate a saved model in its environment",
        "Evaluate a run's model (model.json + model.pt: loading runs no code from the files).",
    )
    command(
        "experiment",
        ExperimentConfig,
        _experiment,
        "run the paper's grid (datasets x methods x seeds), resumable",
        "Runs every (dataset, method, seed) whose result is missing; finished runs are "
        "skipped, so the grid can be done in parts (--time-budget).",
    )
    command(
        "explain",
        ExplainConfig,
        _explain,
        "which pieces of the text the policy reads: a table and a PNG",
        "Weights per piece of the description (dimension label or group) for actor and "
        "critic, averaged over dataset observations: the readout's attention for "
        "pooling=segments, gradient x input for mean/CLS pooling.",
    )
    command(
        "relabel",
        RelabelConfig,
        _relabel,
        "relabel a dataset's rewards from an objective in words (an LM judges each outcome)",
        "Write each trajectory (or window) as an outcome text, ask a judge whether it "
        "satisfies the objective, and write a NeoRL-layout .npz whose rewards come from the "
        "answers (Kwon et al., Reward Design with Language Models). Verdicts are cached: an "
        "interrupted run resumes, a repeated one is free.",
    )
    command(
        "attention",
        AttentionConfig,
        _attention,
        "attention maps of LM Decision Transformers over one trajectory window",
        "Early, middle and last layer attention (averaged over heads) over the (R, s, a) "
        "tokens of one window of the dataset, one row per model (as Reid et al.'s Figure 2: "
        "a pretrained body next to a randomly initialised one).",
    )
    command(
        "report",
        ReportConfig,
        _report,
        "results table, CSV and learning curves from an experiment folder",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import LMEncodersError

    argv = list(argv) if argv is not None else sys.argv[1:]
    args = build_parser().parse_args(argv)
    args.invocation = "lmencoders " + shlex.join(argv)  # what records say made them
    if args.allow_download:
        os.environ[ALLOW_DOWNLOAD] = "1"
    if not args.verbose:  # d3rlpy logs every config and epoch through structlog
        import structlog

        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    try:
        return args.run(args)
    except (LMEncodersError, FileNotFoundError) as exc:
        print(f"lmencoders {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
