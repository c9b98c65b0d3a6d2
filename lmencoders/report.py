"""Results of an experiment folder: ``results.csv``, Markdown tables laid out like the paper's,
learning-curve plots, and ``RESULTS.md`` with the commands and data provenance."""

from __future__ import annotations

import csv
import json
import re
import shlex
import shutil
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .datasets import dataset_md5, file_md5
from .errors import ConfigError, LMEncodersError
from .experiments import METHODS, PAPER_RESULTS, ExperimentConfig, grid_run_names
from .ledger import Ledger, configuration_of, relative_to_here, run_record
from .sections import ANCHOR, place_sections
from .statistics import curve_band

__all__ = ["write_results"]


def _method_of(result: dict) -> str:
    c = result["config"]
    for method, (algo, encoder, tuning, pooling, standardized, samples) in METHODS.items():
        lm = (c["tuning"], c.get("pooling", "mean"), c.get("standardize_features", False))
        if (
            (c["algo"], c["encoder"]) == (algo, encoder)
            and c.get("action_samples") == samples
            and (encoder == "vector" or lm == (tuning, pooling, standardized))
        ):
            return method
    return f"{c['algo']}-{c['encoder']}-{c['tuning']}"


def _finished_runs(out: Path) -> list[tuple[Path, dict]]:
    """Every finished run (a folder with ``result.json``) with its record; of a configuration
    run more than once (``name``, ``name-2``...), only the newest counts, so a rerun never
    enters the statistics as an extra seed."""
    newest: dict[str, tuple[int, Path]] = {}
    for path in sorted((out / "runs").glob("*/result.json")):
        base, attempt = configuration_of(path.parent.name)
        if base not in newest or attempt > newest[base][0]:
            newest[base] = (attempt, path)
    return [
        (path.parent, json.loads(path.read_text()))
        for _, path in sorted(newest.values(), key=lambda item: str(item[1]))
    ]


def _records(out: Path, ledger: Ledger | None) -> tuple[list[tuple[Path, dict]], dict[str, str]]:
    """The runs to report, each as (its folder under ``out``, which may be gone, and its
    record), and, by run, the md5 of the data of the runs that learned from another draw of
    their dataset file than the one here. With a ledger, the finished run folders' records go
    into it first and the report reads the whole ledger, and a file that is not here is the
    draw the ledger holds as current (so a report made without the data, on a fresh clone,
    still keeps the draws apart)."""
    records = [run_record(folder, result) for folder, result in _finished_runs(out)]
    if ledger is not None:
        for record in records:
            ledger.add(record)
        records = ledger.records()
    here: dict[str, str | None] = {}
    earlier = {}
    for record in records:
        path = record["config"]["dataset"]
        if path not in here:
            here[path] = dataset_md5(path) or _current_md5(path, ledger)
        learned_from = record.get("dataset_md5")
        if learned_from and here[path] and learned_from != here[path]:
            earlier[record["run"]] = learned_from
    return [(out / "runs" / r["run"], r) for r in records], earlier


def _current_md5(path: str, ledger: Ledger | None) -> str | None:
    """The md5 of the draw of dataset file ``path`` that the ledger holds as current."""
    entry = ledger.dataset(Path(path).name) if ledger is not None else None
    return entry.get("md5") if entry else None


def _label(result: dict, earlier: dict[str, str]) -> str:
    """The dataset's name in the tables; runs on an earlier draw of the file are their own
    row, named by the md5 of their data."""
    stem = Path(result["config"]["dataset"]).stem
    md5 = earlier.get(result["run"])
    return f"{stem} (earlier draw {md5[:8]})" if md5 else stem


def _earlier_draws(earlier: dict[str, str]) -> str:
    if not earlier:
        return ""
    return (
        f'Rows named "earlier draw" hold {len(earlier)} runs whose dataset file was made again '
        "since (same command, another file: the md5 of the data they learned from is in the "
        "name); they are kept as a draw of their own and left out of the aggregates over tasks."
        "\n\n"
    )


def _tables(out: Path, runs: list[tuple[Path, dict]], earlier: dict[str, str]) -> str:
    """Write ``results.csv`` and the learning curves; return the Markdown tables."""
    rows = []
    for _, result in runs:
        evaluation = result["evaluation"]
        rows.append(
            {
                "dataset": _label(result, earlier),
                "method": _method_of(result),
                "seed": result["config"]["seed"],
                "steps": result["config"]["steps"],
                "batch_size": result["config"]["batch_size"],
                "mean_return": evaluation["mean_return"],
                "normalized_score": evaluation["normalized_score"],
                "episodes": evaluation["episodes"],
                # the learning curve's points before the last (None: as many as the result)
                "curve_episodes": result["config"].get("curve_episodes") or evaluation["episodes"],
                "trajectories": result["dataset_trajectories"],
                "data_return": result["dataset_mean_return"],
                "train_seconds": result["train_seconds"],
                # runs written before these were recorded have neither
                "evaluation_seconds": result.get("evaluation_seconds"),
                "hardware": result.get("hardware", "not recorded"),
                "run": result["run"],
            }
        )
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["dataset"], row["method"])].append(row)
    datasets = sorted({r["dataset"] for r in rows})
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    lines = [
        "| dataset | trajectories | method | return (mean +- std over seeds) | normalised "
        "| seeds | steps | eval episodes | minutes / run (evaluating) | hardware |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for dataset in datasets:
        for method in methods:
            group = groups.get((dataset, method))
            if not group:
                continue
            returns = np.array([r["mean_return"] for r in group])
            scores = [r["normalized_score"] for r in group if r["normalized_score"] is not None]
            normalized = f"{np.mean(scores):.1f} +- {np.std(scores):.1f}" if scores else "-"
            lines.append(
                f"| {dataset} | {_values(group, 'trajectories')} | {method} | "
                f"{returns.mean():.1f} +- {returns.std():.1f} | {normalized} | {len(group)} | "
                f"{_values(group, 'steps')} | {_episodes(group)} | "
                f"{_run_minutes(group)} | {_values(group, 'hardware')} |"
            )
    _remove_pictures(out)
    _plot_curves(out, rows, {result["run"]: result.get("curve", []) for _, result in runs})
    summary = _summary(groups, datasets, methods) + "\n\nEvery cell:\n\n" + "\n".join(lines)
    earlier_rows = {_label(r, earlier) for _, r in runs if r["run"] in earlier}
    return summary + "\n\n" + _statistics(out, rows, methods, earlier_rows)


BASELINE = "TD3+BC"


def _statistics(
    out: Path, rows: list[dict], methods: list[str], earlier: set[str] = frozenset()
) -> str:
    """rliable's intervals per task and overall (not over ``earlier`` draws, which would count
    a task twice), P(LM variant > TD3+BC), the paired per-seed table, and the interval plot
    (``intervals.png``)."""
    from . import statistics

    tasks = statistics.scores_by_task(rows)
    variants = [m for m in methods if "LM" in m and BASELINE in methods]
    lines = [
        "## Statistics (rliable: stratified bootstrap, 95% intervals)",
        "",
        "Scores: NeoRL-normalised where NeoRL has references, raw return otherwise (FinRL). "
        f"P(X > {BASELINE}) is the probability that a run of X scores above a run of "
        f"{BASELINE} on the same task.",
        "",
        f"| task | method | seeds | IQM | mean | P(method > {BASELINE}) | the interval supports |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, task in sorted(tasks.items()):
        estimates = statistics.aggregates([task], methods)
        for method, values in estimates.items():
            seeds = len(task.by_method[method])
            cells = _estimate_cells([task], method, values, variants)
            lines.append(f"| {name} | {method} | {seeds} | {cells} |")
    normalised = [t for n, t in sorted(tasks.items()) if t.normalised and n not in earlier]
    # a variant that has not run on every task yet (a new one) stays out of the aggregate,
    # rather than shrinking it to the tasks it has reached
    partial = [v for v in variants if not all(v in t.by_method for t in normalised)]
    compared = [BASELINE, *(v for v in variants if v not in partial)] if variants else methods
    waiting = [t.task for t in normalised if not statistics.ready(t, compared)]
    normalised = [t for t in normalised if t.task not in waiting]
    overall = statistics.aggregates(normalised, methods) if normalised else {}
    if overall:
        left_out = (
            f" Left out until {', '.join(compared)} each have {statistics.MIN_RUNS} runs there: "
            f"{', '.join(waiting)}."
            if waiting
            else ""
        )
        if partial:
            left_out += f" Not yet run on every task, so not in this table: {', '.join(partial)}."
        lines += [
            "",
            f"Over the {len(normalised)} tasks with normalised scores "
            f"({', '.join(t.task for t in normalised)}), on the seeds every task has.{left_out}",
            "",
            f"| method | IQM | mean | P(method > {BASELINE}) | the interval supports |",
            "|---|---|---|---|---|",
        ]
        for method, values in overall.items():
            lines.append(f"| {method} | {_estimate_cells(normalised, method, values, variants)} |")
        _plot_intervals(out, overall)
        lines += ["", "![intervals](results/intervals.png)"]
    lines += ["", _paired_table(tasks, variants)]
    return "\n".join(lines)


def _estimate_cells(tasks: list, method: str, values: dict, variants: list[str]) -> str:
    """IQM | mean | P(method > TD3+BC) | what that interval supports (LM variants only)."""
    from . import statistics

    probability = statistics.improvement(tasks, method, BASELINE) if method in variants else None
    words = ""
    if probability:
        fewest = min(statistics.runs(tasks, method), statistics.runs(tasks, BASELINE))
        words = statistics.verdict(probability, method, BASELINE, fewest)
    return f"{values['IQM']} | {values['mean']} | {probability or '-'} | {words}"


def _paired_table(tasks: dict, variants: list[str]) -> str:
    """Per task and seed: TD3+BC next to each LM variant (same data, same seed)."""
    if not variants:
        return ""
    lines = [
        f"Paired by seed (score of {BASELINE}, of each variant, and the difference):",
        "",
        f"| task | seed | {BASELINE} | " + " | ".join(variants) + " |",
        "|---|---|---|" + "---|" * len(variants),
    ]
    for name, task in sorted(tasks.items()):
        base = task.by_method.get(BASELINE, {})
        for seed in sorted(base):
            cells = []
            for variant in variants:
                value = task.by_method.get(variant, {}).get(seed)
                cells.append("-" if value is None else f"{value:.1f} ({value - base[seed]:+.1f})")
            lines.append(f"| {name} | {seed} | {base[seed]:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot_intervals(out: Path, overall: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rliable import plot_utils

    methods = list(overall)
    points = {m: np.array([overall[m]["IQM"].point, overall[m]["mean"].point]) for m in methods}
    intervals = {
        m: np.array(
            [
                [overall[m][k].low for k in ("IQM", "mean")],
                [overall[m][k].high for k in ("IQM", "mean")],
            ]
        )
        for m in methods
    }
    figure, _ = plot_utils.plot_interval_estimates(
        points, intervals, metric_names=["IQM", "Mean"], algorithms=methods,
        xlabel="NeoRL-normalised score", xlabel_y_coordinate=-0.35, row_height=0.6,
    )  # fmt: skip
    figure.savefig(out / "intervals.png", dpi=110, bbox_inches="tight")
    plt.close(figure)


def _summary(groups: dict, datasets: list[str], methods: list[str]) -> str:
    """Datasets x methods, as the paper lays out its table: mean return (seeds), next to the
    return of the data itself (what behaviour cloning can reach)."""
    lines = [
        "| dataset | data | " + " | ".join(methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for dataset in datasets:
        runs = [run for (d, _), group in groups.items() if d == dataset for run in group]
        cells = [_values(runs, "data_return", "{:.1f}")]
        for method in methods:
            returns = [r["mean_return"] for r in groups.get((dataset, method), [])]
            cells.append(f"{np.mean(returns):.1f} ({len(returns)})" if returns else "-")
        lines.append(f"| {dataset} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _run_minutes(group: list[dict]) -> str:
    """Mean minutes per run and the share of them spent evaluating (a live LM on CPU runs
    once per environment step, so evaluation can dominate a run)."""
    minutes = np.mean([r["train_seconds"] for r in group]) / 60
    evaluating = [r["evaluation_seconds"] / r["train_seconds"] for r in group
                  if r["evaluation_seconds"] is not None and r["train_seconds"] > 0]  # fmt: skip
    return f"{minutes:.1f} ({np.mean(evaluating):.0%})" if evaluating else f"{minutes:.1f} (-)"


def _episodes(group: list[dict]) -> str:
    """The result's evaluation episodes, and the curve's where they were fewer."""
    final, curve = _values(group, "episodes"), _values(group, "curve_episodes")
    return final if curve == final else f"{final} (curve {curve})"


def _values(group: list[dict], key: str, form: str = "{}") -> str:
    """The distinct values of a column in a group of runs (one, unless settings were mixed)."""
    return ", ".join(form.format(v) for v in sorted({r[key] for r in group}))


# the pictures a report draws: all of them are drawn again, so none outlives its runs
PICTURES = ("curves-*.png", "explain-*.png", "intervals.png")


def _remove_pictures(folder: Path) -> None:
    for pattern in PICTURES:
        for picture in folder.glob(pattern):
            picture.unlink()


def _plot_curves(out: Path, rows: list[dict], curves_of: dict[str, list]) -> None:
    """One picture per dataset with a learning curve: mean over seeds and a bootstrap band
    per method (runs recorded without their curve are not in it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for dataset in sorted({r["dataset"] for r in rows if curves_of.get(r["run"])}):
        figure, axis = plt.subplots(figsize=(7, 4.5))
        for method in METHODS:
            curves = [
                curves_of[r["run"]]
                for r in rows
                if r["dataset"] == dataset and r["method"] == method and curves_of.get(r["run"])
            ]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            steps = [s for s, _ in curves[0][:length]]
            values = np.array([[v for _, v in c[:length]] for c in curves])
            mean, low, high = curve_band(values)
            axis.plot(steps, mean, label=f"{method} ({len(curves)} seeds)")
            axis.fill_between(steps, low, high, alpha=0.15)
        for data_return in sorted({r["data_return"] for r in rows if r["dataset"] == dataset}):
            axis.axhline(data_return, color="gray", linestyle="--", linewidth=1)
            axis.annotate(
                "data",
                (0.99, data_return),
                xycoords=("axes fraction", "data"),
                ha="right",
                va="bottom",
                color="gray",
                fontsize=8,
            )
        axis.set_xlabel("gradient steps")
        axis.set_ylabel("evaluation return (mean over seeds, 95% bootstrap band)")
        axis.set_title(dataset)
        axis.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(out / f"curves-{dataset}.png", dpi=110)
        plt.close(figure)


def _paper_table() -> str:
    methods = list(METHODS)
    lines = [
        "| NeoRL v1 task (low, 99 trajectories) | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for task, scores in PAPER_RESULTS.items():
        lines.append(f"| {task} | " + " | ".join(str(scores.get(m, "-")) for m in methods) + " |")
    return "\n".join(lines)


def _provenance(
    runs: list[tuple[Path, dict]], earlier: dict[str, str], ledger: Ledger | None
) -> str:
    """Where each dataset of the runs came from: the collector's ``collect.json`` beside the
    file (NeoRL's own files have none), else what the ledger kept of it (of an earlier draw
    too)."""
    files = {_label(r, earlier): (Path(r["config"]["dataset"]), earlier.get(r["run"]))
             for _, r in runs}  # fmt: skip
    found = {}
    lines = []
    for label, (path, md5) in sorted(files.items()):
        entry = None if md5 else _collected(path)
        if entry is None and ledger is not None:
            entry = ledger.dataset(path.name, md5)
        if entry is None:
            lines.append(f"- `{label}`: no collector record of it")
            continue
        if not md5 and path.is_file():
            found[path.name] = entry
        draw = label.removeprefix(path.stem)  # " (earlier draw ...)" or nothing
        lines.append(
            f"- `{path.name}`{draw} (md5 {entry['md5']}): `{entry['command']}`; "
            f"best SAC return {entry['best_sac_return']:.1f}, {entry['level']} "
            f"policy from SAC step {entry['policy_step']}; {entry['trajectories']} trajectories, "
            f"return {entry['mean_return']:.1f} +- {entry['std_return']:.1f}"
            + (f"; made on {entry['made_on']}" if entry.get("made_on") else "")
        )
    if ledger is not None:
        ledger.add_datasets(found)
    return "\n".join(lines)


def _collected(path: Path) -> dict | None:
    """What ``collect.json`` beside a dataset file says of it, with the file's md5."""
    record_file = path.parent / "collect.json"
    record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    made = record.get("datasets", {}).get(path.name)
    if made is None or not path.is_file():
        return None
    return {
        "md5": file_md5(path),
        "command": relative_to_here(record["command"]),
        "best_sac_return": max(c["return"] for c in record["sac_checkpoints"]),
        "level": made["level"],
        "policy_step": made["policy_step"],
        "trajectories": made["trajectories"],
        "mean_return": made["mean_return"],
        "std_return": made["std_return"],
        "made_on": made.get("made_on"),
    }


def _commands(out: Path, runs: list[tuple[Path, dict]]) -> list[str]:
    """The commands that made the finished runs, each once, as the runs recorded them (a run
    made on another machine brings its own). Older runs, which did not record theirs, fall back
    on the logged ``lmencoders experiment`` calls (``experiment.json``) whose grid holds them."""
    unrecorded = {configuration_of(d.name)[0] for d, result in runs if not result.get("command")}
    log = out / "experiment.json"
    logged = []
    for entry in json.loads(log.read_text()) if unrecorded and log.is_file() else []:
        try:
            holds_one = bool(grid_run_names(ExperimentConfig(**entry["config"])) & unrecorded)
        except (ConfigError, TypeError):  # logged by a version with other options: kept
            holds_one = True
        if holds_one:
            logged.append(entry["command"])
    own = [result["command"] for _, result in runs if result.get("command")]
    return list(dict.fromkeys(_whole_grid(relative_to_here(c)) for c in logged + own))


def _whole_grid(command: str) -> str:
    """An experiment command without its ``--time-budget``, which only ends a part early: the
    command that makes every run of the grid (finished ones are skipped)."""
    words = shlex.split(command)
    if "--time-budget" in words:
        at = words.index("--time-budget")
        del words[at : at + 2]
    return shlex.join(words)


def _attributions(
    runs: list[tuple[Path, dict]],
    figures: Path,
    ledger: Ledger | None,
    earlier: dict[str, str] | None = None,
    rows: int = 64,
) -> str:
    """One picture per task and LM method of the pieces its policy reads: the first seed's
    run that was explained before (its record keeps the weights) or whose model is here,
    explained on observations of its own dataset (``lmencoders explain``)."""
    from .explain import Explanation, draw, explain

    earlier = earlier or {}
    by_key: dict[tuple[str, str], list[tuple[int, Path, dict]]] = {}
    for run_dir, result in runs:
        config = result["config"]
        if config["encoder"] == "lm":
            key = (_label(result, earlier), _method_of(result))
            by_key.setdefault(key, []).append((config["seed"], run_dir, result))
    lines = []
    for (name, method), candidates in sorted(by_key.items()):
        dataset = candidates[0][2]["config"]["dataset"]
        # explained before, or its model and its own data are here
        usable = [c for c in sorted(candidates, key=lambda c: c[0]) if "explanation" in c[2]
                  or (c[1].is_dir() and c[2]["run"] not in earlier)]  # fmt: skip
        if not usable:
            lines.append(f"- {name}, {method}: no picture, no run of it is on this machine")
            continue
        seed, run_dir, result = usable[0]
        if "explanation" in result:
            explanation = Explanation.from_record(result["explanation"])
        elif not Path(dataset).is_file():
            lines.append(f"- {name}, {method}: no picture, `{dataset}` is not on this machine")
            continue
        else:
            try:
                explanation = explain(run_dir, dataset, rows=rows)
            except LMEncodersError as error:  # an unreadable run costs its picture, not the report
                lines.append(f"- {name}, {method}: no picture ({error})")
                continue
            result["explanation"] = explanation.to_record()
            if ledger is not None:
                ledger.add(result)
        slug = re.sub(r"[^a-z0-9]+", "-", method.lower()).strip("-")
        stem = re.sub(r"[^A-Za-z0-9.-]+", "-", name).strip("-")
        png = draw(explanation, figures / f"explain-{stem}-{slug}.png")
        actor = explanation.weights[next(iter(explanation.weights))]
        top = ", ".join(f"{explanation.labels[i]} ({actor[i]:.2f})" for i in np.argsort(-actor)[:3])
        lines.append(
            f"- **{name}, {method}** (seed {seed}, {explanation.method}, "
            f"{explanation.observations} observations): "
            f"most weight on {top}\n\n  ![{png.stem}](results/{png.name})"
        )
    if not lines:
        return ""
    return (
        "## Which pieces the policy reads\n\n"
        f"Per task and LM method, the first seed's run explained on up to {rows} observations "
        "of its dataset (`lmencoders explain`): the readout's attention per piece for LM-Segments, "
        "gradient x input per piece for mean-pooled LMs. The text names the actor's three "
        "heaviest pieces; each picture shows actor and critic.\n\n" + "\n".join(lines) + "\n\n"
    )


def _curves_note(runs: list[tuple[Path, dict]]) -> str:
    missing = sum(1 for _, result in runs if not result.get("curve"))
    if not missing:
        return ""
    return (
        f"{missing} of the {len(runs)} runs have no learning curve in their record (kept from "
        "an earlier report after their folders were lost) and are not in the curves.\n\n"
    )


def write_results(
    out_dir: str | Path,
    results_file: str | Path = "RESULTS.md",
    notes: str = "",
    sections: Sequence[str | Path] = (),
    ledger: str | Path | None = None,
) -> str:
    """Write ``RESULTS.md`` (table, commands, paper numbers) with its CSV and plots in a
    ``results/`` folder beside it, and the other generated reports in ``sections`` as
    sections of it; returns the table. With a ``ledger`` folder, every finished run's record
    is kept there and the report reads all its records, those of runs whose folders are gone
    included (:mod:`lmencoders.ledger`)."""
    out, target = Path(out_dir), Path(results_file)
    kept = Ledger(ledger) if ledger is not None else None
    runs, earlier = _records(out, kept)
    if not runs:
        raise FileNotFoundError(f"no finished runs under {out / 'runs'}")
    out.mkdir(parents=True, exist_ok=True)
    table = _tables(out, runs, earlier)
    figures = target.parent / "results"
    figures.mkdir(parents=True, exist_ok=True)
    _remove_pictures(figures)  # of runs an earlier report held (datasets since replaced)
    shutil.copy(out / "results.csv", figures / "results.csv")
    plots = []
    for png in sorted(out.glob("curves-*.png")):
        shutil.copy(png, figures / png.name)
        plots.append(f"![{png.stem}](results/{png.name})")
    if (out / "intervals.png").is_file():
        shutil.copy(out / "intervals.png", figures / "intervals.png")
    commands = "\n".join(_commands(out, runs)) or "(not recorded)"
    text = (
        "# Results: does language help offline RL?\n\n"
        "Generated by `lmencoders report` from the runs of `lmencoders experiment` "
        "(do not edit the tables by hand).\n\n"
        f"Commands that produced the runs:\n\n```\n{commands}\n```\n\n"
        f"Datasets:\n\n{_provenance(runs, earlier, kept)}\n\n"
        + _earlier_draws(earlier)
        + "Returns are undiscounted evaluation returns of the final policy (mean over the "
        "evaluation episodes of a run), then averaged over seeds. The first table is laid out "
        "like the paper's (mean return, number of seeds in brackets), after the mean return of "
        "the training trajectories themselves (data); the second gives each "
        "cell's std over seeds, NeoRL-normalised score (random/expert references) and "
        "settings.\n\n"
        f"{table}\n\n"
        + "".join(f"{plot}\n\n" for plot in plots)
        + _curves_note(runs)
        + _attributions(runs, figures, kept, earlier)
        + (f"{notes.strip()}\n\n" if notes else "")
        + f"{ANCHOR}\n\n"
        "Tarasov et al. (2022): raw returns on NeoRL v1 low datasets (99 trajectories); "
        "the paper gives no LM-Finetune number for FinRL.\n\n"
        f"{_paper_table()}\n"
    )
    target.write_text(place_sections(text, sections, target))
    return table
