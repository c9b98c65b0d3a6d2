"""Does a pretrained LM help a Decision Transformer here? (Reid et al. 2022, CPU-sized.)

Variants, same data, same context and batch, same seeds:

- ``dt``: d3rlpy's own Decision Transformer, randomly initialised, sized like the LM
  (6 layers, 12 heads, 384 wide: all-MiniLM-L6-v2's shape);
- ``random``: the LM Decision Transformer's architecture from random weights;
- ``pretrained``: the same, initialised from MiniLM (full fine-tuning, as Reid et al.);
- ``pretrained+cos``: plus the alignment loss L_cos (K-means over MiniLM's vocabulary);
- ``lora``: pretrained with LoRA (LaMo).

Each run evaluates every ``--eval-every`` steps (return vs gradient steps and vs wall-clock:
faster convergence is half of Reid et al.'s claim) and leaves a JSON in ``<out>/runs``; a
finished run is skipped, so the comparison can be run in parts (``--time-budget``).

    python benchmarks/lm_decision_transformer.py --out results/lm-decision-transformer \\
        --datasets benchmarks/data/hopper-sac60k/Hopper-v5-medium-30-train.npz \\
                   benchmarks/data/hopper-sac60k/Hopper-v5-high-30-train.npz
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import d3rlpy
import numpy as np

import lmencoders
from lmencoders.alignment import language_centroids
from lmencoders.backbone import language_model
from lmencoders.datasets import load_dataset
from lmencoders.envs import make_env, normalized_score
from lmencoders.statistics import aggregates, curve_band, improvement, scores_by_task, verdict
from lmencoders.train import hardware

VARIANTS = ("dt", "random", "pretrained", "pretrained+cos", "lora")


def build(variant: str, args: argparse.Namespace) -> d3rlpy.base.LearnableBase:
    common = dict(
        context_size=args.context, batch_size=args.batch_size, max_timestep=1000,
        learning_rate=args.learning_rate,
        reward_scaler=d3rlpy.preprocessing.MultiplyRewardScaler(args.reward_scale),
    )  # fmt: skip
    if variant == "dt":
        return d3rlpy.algos.DecisionTransformerConfig(
            encoder_factory=d3rlpy.models.VectorEncoderFactory(hidden_units=[384]),
            num_heads=12, num_layers=6, position_encoding_type=d3rlpy.PositionEncodingType.SIMPLE,
            optim_factory=d3rlpy.optimizers.AdamWFactory(
                weight_decay=1e-4, clip_grad_norm=0.25,
                lr_scheduler_factory=d3rlpy.optimizers.WarmupSchedulerFactory(args.warmup),
            ),
            **common,
        ).create(device=args.device)  # fmt: skip
    lm = dict(
        model=args.model, cos_weight=0.1 if variant == "pretrained+cos" else 0.0,
        pretrained=variant != "random", tuning="lora" if variant == "lora" else "full",
        cos_anneal_steps=args.steps // 2,
        optim_factory=d3rlpy.optimizers.AdamWFactory(
            weight_decay=1e-4, clip_grad_norm=0.25,
            lr_scheduler_factory=d3rlpy.optimizers.WarmupSchedulerFactory(args.warmup),
        ),
    )  # fmt: skip
    return lmencoders.LMDecisionTransformerConfig(**lm, **common).create(device=args.device)


def run(dataset_path: str, variant: str, seed: int, args: argparse.Namespace) -> dict:
    dataset = load_dataset(dataset_path)
    if variant == "pretrained+cos":  # K-means once, cached, outside the timed training
        language_centroids(language_model(args.model), 1000)
    d3rlpy.seed(seed)
    algo = build(variant, args)
    returns = dataset.returns()
    target = float(returns.max()) * args.target_scale
    env_name = dataset.env or "Hopper-v5"
    env = make_env(env_name)
    curve: list[dict] = []
    started = time.perf_counter()
    evaluation_seconds = 0.0

    def evaluate(algo: d3rlpy.base.LearnableBase, epoch: int, step: int) -> None:
        nonlocal evaluation_seconds
        if step % args.eval_every:
            return
        began = time.perf_counter()
        env.reset(seed=10_000 * seed)
        score = d3rlpy.metrics.evaluate_transformer_with_environment(
            algo.as_stateful_wrapper(target_return=target), env, n_trials=args.episodes
        )
        evaluation_seconds += time.perf_counter() - began
        seconds = time.perf_counter() - started - evaluation_seconds
        curve.append({"step": step, "train_seconds": seconds, "return": float(score)})
        print(
            f"{variant} seed {seed} step {step}: return {score:.1f} ({seconds:.0f} s)", flush=True
        )

    algo.fit(
        dataset.buffer, n_steps=args.steps, n_steps_per_epoch=args.steps, show_progress=False,
        save_interval=10**9, logger_adapter=d3rlpy.logging.NoopAdapterFactory(),
        callback=evaluate,
    )  # fmt: skip
    if variant != "dt" and seed == args.seeds[0]:  # for `lmencoders attention` (not committed)
        lmencoders.save_model(
            algo, Path(args.out) / "work" / f"{Path(dataset_path).stem}-{variant}"
        )
    return {
        "dataset": Path(dataset_path).stem, "env": env_name, "variant": variant, "seed": seed,
        "data_return": float(returns.mean()),
        "target_return": target, "curve": curve, "final_return": curve[-1]["return"],
        "train_seconds": curve[-1]["train_seconds"],
    }  # fmt: skip


def time_updates(dataset_path: str, args: argparse.Namespace, command: str) -> None:
    """Seconds per gradient step of each variant (mean over steps 3..N: the first ones build
    the model and warm caches), written to ``<out>`` for the report: the runs' own seconds
    come from a shared machine, these from one with nothing else running."""
    dataset = load_dataset(dataset_path)
    times: dict[str, float] = {}
    for variant in args.variants:
        if variant == "pretrained+cos":
            language_centroids(language_model(args.model), 1000)
        algo = build(variant, args)
        stamps: list[float] = []
        algo.fit(
            dataset.buffer, n_steps=args.time_updates, n_steps_per_epoch=args.time_updates,
            show_progress=False, save_interval=10**9,
            logger_adapter=d3rlpy.logging.NoopAdapterFactory(),
            callback=lambda algo, epoch, step, stamps=stamps: stamps.append(time.perf_counter()),
        )  # fmt: skip
        seconds = float(np.diff(stamps)[2:].mean())
        times[variant] = seconds * 1e3
        print(
            f"{variant}: context {args.context}, batch {args.batch_size}, {args.device}: "
            f"{seconds * 1e3:.0f} ms/update"
        )
    record = {
        "command": command, "context": args.context, "batch_size": args.batch_size,
        "device": args.device, "hardware": hardware(args.device), "updates": args.time_updates,
        "ms_per_update": times,
    }  # fmt: skip
    Path(args.out).mkdir(parents=True, exist_ok=True)
    update_times_file(Path(args.out), args, args.device).write_text(json.dumps(record, indent=1))


def update_times_file(out: Path, args: argparse.Namespace, device: str = "cpu") -> Path:
    """Where ``--time-updates`` keeps its measurement: one file per settings and device."""
    return out / f"update-times-context{args.context}-batch{args.batch_size}-{device}.json"


def update_times_section(record: dict | None, runs: list[dict]) -> list[str]:
    """The per-update cost of each variant measured alone (``--time-updates``: ``record``),
    and what it makes of the steps each variant needed to reach the data's return."""
    if record is None:
        return []
    lines = [
        "",
        f"## Cost per update, measured alone ({record['hardware']}, {record['device']})",
        "",
        "The seconds above come from a shared machine; these were measured with nothing else "
        f"running (`{record['command']}`, mean of updates 3-{record['updates']}). The last "
        "column is the mean first step at the data's return (table above, all datasets) times "
        "that cost: Reid et al.'s faster-convergence claim in seconds.",
        "",
        "| variant | ms per update | seconds to the data's return (steps x cost) |",
        "|---|---|---|",
    ]
    for variant, ms in record["ms_per_update"].items():
        group = [r for r in runs if r["variant"] == variant]
        steps = [step for step in first_steps(group) if step is not None]
        reach = f"{np.mean(steps) * ms / 1e3:.0f}" if steps else "-"
        lines.append(f"| {variant} | {ms:.0f} | {reach} |")
    return lines


def write_markdown(out: Path, runs: list[dict], args: argparse.Namespace, command: str) -> None:
    timing = update_times_file(out, args)  # the runs' own settings, on the CPU
    record = json.loads(timing.read_text()) if timing.is_file() else None
    alone = record["ms_per_update"] if record else {}
    if not all(r["variant"] in alone for r in runs):  # one axis for all, or the runs' own
        alone = {}
    lines = [
        "# Decision Transformers from a pretrained LM: CPU-sized comparison",
        "",
        f"Generated by `benchmarks/lm_decision_transformer.py`:\n\n```\n{command}\n```",
        "",
        f"{args.steps} gradient steps, context {args.context}, batch {args.batch_size}, "
        f"evaluation every {args.eval_every} steps over {args.episodes} episodes, target "
        f"return {args.target_scale} x the data's best. The table's seconds are training "
        "time only, on a 2-core machine that ran other jobs beside these runs (how many "
        "varied), so they compare poorly between runs; the curves' seconds axis uses each "
        "variant's cost per update measured alone (last section) once every variant's is.",
        "",
        "The final return rests on one evaluation; the mean over a run's evaluations (every "
        "point of its curve) is a less noisy summary of the same run.",
        "",
        "| dataset (data's return) | variant | seeds | final return (mean +- std) "
        "| mean over evaluations (mean +- std) | train s per run "
        "| first step at the data's return (runs reaching it) |",
        "|---|---|---|---|---|---|---|",
    ]
    datasets = sorted({r["dataset"] for r in runs})
    for dataset in datasets:
        for variant in VARIANTS:
            group = [r for r in runs if r["dataset"] == dataset and r["variant"] == variant]
            if not group:
                continue
            final = np.array([r["final_return"] for r in group])
            overall = np.array([np.mean([p["return"] for p in r["curve"]]) for r in group])
            seconds = np.mean([r["train_seconds"] for r in group])
            data = group[0].get("data_return")
            name = dataset if data is None else f"{dataset} ({data:.1f})"
            lines.append(
                f"| {name} | {variant} | {len(group)} | {final.mean():.1f} +- {final.std():.1f} "
                f"| {overall.mean():.1f} +- {overall.std():.1f} "
                f"| {seconds:.0f} | {first_reaching(group)} |"
            )
    lines.append("")
    for dataset in datasets:
        plot_curves(out, dataset, [r for r in runs if r["dataset"] == dataset], alone)
        lines += [f"![{dataset}](curves-{dataset}.png)", ""]
    lines += statistics_section(runs)
    lines += update_times_section(record, runs)
    lines += attention_section(out)
    (out / "RESULTS.md").write_text("\n".join(lines) + "\n")


def attention_section(out: Path) -> list[str]:
    """The attention pictures drawn from the first seed's models (kept in ``<out>/work``)."""
    pictures = sorted(out.glob("attention-*.png"))
    if not pictures:
        return []
    lines = [
        "",
        "## Attention (Reid et al.'s Figure 2)",
        "",
        "Early, middle and last layer of the first seed's pretrained (top) and random (bottom) "
        "models over trajectory 0's first window, averaged over heads: `lmencoders attention "
        f"{out}/work/DATASET-pretrained {out}/work/DATASET-random --dataset FILE`.",
        "",
    ]
    return lines + [f"![{p.stem}]({p.name})\n" for p in pictures]


def plot_curves(out: Path, dataset: str, runs: list[dict], alone: dict[str, float]) -> None:
    """Return against gradient steps and against training seconds (the costs measured alone
    where ``alone`` has them), mean over seeds with a bootstrap band, the data's return
    dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for variant in VARIANTS:
        group = [r for r in runs if r["variant"] == variant]
        if not group:
            continue
        length = min(len(r["curve"]) for r in group)
        values = np.array([[p["return"] for p in r["curve"][:length]] for r in group])
        steps = [p["step"] for p in group[0]["curve"][:length]]
        if alone:  # the cost measured alone: comparable between variants
            wall = np.array(steps) * alone[variant] / 1e3
        else:
            wall = np.mean([[p["train_seconds"] for p in r["curve"][:length]] for r in group], 0)
        mean, low, high = curve_band(values)
        for axis, x in ((by_step, steps), (by_time, wall)):
            seeds = f"{len(group)} seed" + ("s" if len(group) > 1 else "")
            axis.plot(x, mean, label=f"{variant} ({seeds})")
            axis.fill_between(x, low, high, alpha=0.15)
    by_step.set_xlabel("gradient steps")
    by_time.set_xlabel(
        "training seconds: steps x cost per update measured alone"
        if alone
        else "training seconds (shared 2-core CPU)"
    )
    data = runs[0].get("data_return")
    for axis in (by_step, by_time):
        if data is not None:
            axis.axhline(data, color="grey", linestyle="--", linewidth=1, label="data")
        axis.set_ylabel("evaluation return")
        axis.legend(fontsize=8)
    figure.suptitle(dataset)
    figure.tight_layout()
    figure.savefig(out / f"curves-{dataset}.png", dpi=110)
    plt.close(figure)


def first_steps(group: list[dict]) -> list[int | None]:
    """Each run's first evaluated step whose return reaches the data's mean return (``None``:
    never)."""
    return [
        next((p["step"] for p in r["curve"] if p["return"] >= r["data_return"]), None)
        for r in group
        if r.get("data_return") is not None
    ]


def first_reaching(group: list[dict]) -> str:
    """Mean first evaluated step whose return reaches the data's mean return (convergence
    speed, Reid et al.'s second claim), over the runs that reach it."""
    steps = first_steps(group)
    reached = [s for s in steps if s is not None]
    if not steps:
        return "-"
    return (
        f"{np.mean(reached):.0f} ({len(reached)}/{len(steps)})"
        if reached
        else f"- (0/{len(steps)})"
    )


MIN_SEEDS = 3
PAIRS = [("pretrained", "random"), ("pretrained+cos", "pretrained"), ("random", "dt"),
         ("pretrained", "dt"), ("lora", "pretrained")]  # fmt: skip


def statistics_section(runs: list[dict]) -> list[str]:
    """rliable's IQM and P(improvement) over the final returns (NeoRL-normalised): which
    differences the intervals support."""
    rows = [
        {"dataset": r["dataset"], "method": r["variant"], "seed": r["seed"],
         "mean_return": r["final_return"],
         "normalized_score": normalized_score(r.get("env", "Hopper-v5"), r["final_return"])}
        for r in runs
    ]  # fmt: skip
    tasks = list(scores_by_task(rows).values())
    # an interval from one or two runs says nothing: only variants with 3+ seeds on every task
    present = [
        v for v in VARIANTS
        if all(len(t.by_method.get(v, {})) >= MIN_SEEDS for t in tasks)
    ]  # fmt: skip
    lines = [
        "",
        "## Statistics (rliable, final returns as NeoRL-normalised scores, 95% intervals)",
        "",
        "| variant | IQM | mean |",
        "|---|---|---|",
    ]
    for variant, values in aggregates(tasks, present).items():
        lines.append(f"| {variant} | {values['IQM']} | {values['mean']} |")
    lines += [
        "",
        "| comparison | P(first > second) | what the interval supports |",
        "|---|---|---|",
    ]
    if not present:
        return lines[:3] + [f"(intervals once a variant has {MIN_SEEDS} seeds on every dataset)"]
    for first, second in PAIRS:
        if first not in present or second not in present:
            continue
        probability = improvement(tasks, first, second)
        if probability is not None:
            lines.append(
                f"| {first} vs {second} | {probability} | {verdict(probability, first, second)} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", required=True)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--model", default=lmencoders.DEFAULT_MODEL)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--episodes", type=int, default=5)
    # Reid et al. use context 20, batch 64: 3.54 s a full-tuning MiniLM update on this 2-core
    # CPU (one thread, --time-updates 8); context 10, batch 16: 0.48 s (full), 0.32 s (LoRA)
    parser.add_argument("--context", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--reward-scale", type=float, default=0.001)
    parser.add_argument("--target-scale", type=float, default=1.2)
    parser.add_argument("--time-budget", type=float, default=None, help="seconds; then stop")
    parser.add_argument("--out", default="results/lm-decision-transformer")
    parser.add_argument(
        "--time-updates", type=int, default=0, help="only time this many updates per variant"
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="write RESULTS.md from the finished runs, run none",
    )
    args = parser.parse_args()
    argv = [a for a in sys.argv[1:] if a != "--report-only"]  # the command that runs them
    command = "python " + shlex.join(["benchmarks/lm_decision_transformer.py", *argv])
    if args.time_updates:
        if args.time_updates < 4:
            parser.error("--time-updates needs at least 4 updates (the first two are warm-up)")
        time_updates(args.datasets[0], args, command)
        return
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for dataset in [] if args.report_only else args.datasets:
        for seed in args.seeds:
            for variant in args.variants:
                done = out / "runs" / f"{Path(dataset).stem}-{variant}-seed{seed}.json"
                if done.is_file():
                    continue
                if args.time_budget and time.perf_counter() - started > args.time_budget:
                    print("time budget spent: the rest is left for a later part")
                    break
                done.write_text(json.dumps(run(dataset, variant, seed, args), indent=1))
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    paths, data_returns = {Path(d).stem: d for d in args.datasets}, {}
    for r in runs:  # runs written before the field existed: read it from their dataset
        if "data_return" not in r and r["dataset"] in paths:
            if r["dataset"] not in data_returns:
                data = load_dataset(paths[r["dataset"]])
                data_returns[r["dataset"]] = float(data.returns().mean())
            r["data_return"] = data_returns[r["dataset"]]
    write_markdown(out, runs, args, command)
    print(f"wrote {out / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
