"""The command line: collect -> train -> evaluate, and describe (tiny sizes, real MuJoCo)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lmencoders.cli import main
from lmencoders.collect import pick_policies
from lmencoders.datasets import read_neorl_file
from lmencoders.errors import ConfigError
from lmencoders.machine import made_on
from lmencoders.saving import load_model


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    out = tmp_path_factory.mktemp("collect")
    args = [
        "collect",
        "--env",
        "Hopper-v5",
        "--out",
        str(out),
        "--sac-steps",
        "400",
        "--checkpoint-every",
        "200",
        "--eval-episodes",
        "1",
        "--selection-episodes",
        "2",
        "--levels",
        "low",
        "high",
        "--train",
        "3",
        "--val",
        "1",
        "--max-episode-steps",
        "30",
    ]
    assert main(args) == 0
    return out, args


def test_collect_writes_neorl_files_and_a_record(collected):
    out, _ = collected
    record = json.loads((out / "collect.json").read_text())
    assert [c["step"] for c in record["sac_checkpoints"]] == [200, 400]
    # every checkpoint evaluated again, over --selection-episodes, kept for a rerun
    kept = json.loads((out / "sac-checkpoints.json").read_text())
    assert [c["selection_return"] for c in kept] == [
        c["selection_return"] for c in record["sac_checkpoints"]
    ]
    assert all(c["selection_std"] >= 0 for c in kept)
    for name in [
        "Hopper-v5-low-3-train.npz",
        "Hopper-v5-low-1-val.npz",
        "Hopper-v5-high-3-train.npz",
        "Hopper-v5-high-1-val.npz",
    ]:
        data = read_neorl_file(out / name)
        assert data.obs.shape[1] == 12 and data.reward.shape[1] == 1  # NeoRL layout
        assert record["datasets"][name]["mean_return"] == pytest.approx(data.returns().mean())
        # another CPU or package version makes other trajectories: the record names both
        assert record["datasets"][name]["made_on"] == made_on()
        assert f"torch {torch.__version__.split('+')[0]}" in made_on()
    assert not list(out.rglob("*.tmp"))


def test_kept_policies_remake_the_same_files_without_sac(collected, tmp_path, capsys, monkeypatch):
    """--policies keeps each level's policy (the policy network alone) and the checkpoint list;
    the same command with a fresh --out remakes byte-identical files without training SAC, and
    other SAC settings are refused with the setting named."""
    out, args = collected
    kept = tmp_path / "kept"
    assert main(args + ["--policies", str(kept)]) == 0  # SAC is done: only the policies are kept
    sizes = [p.stat().st_size for p in kept.glob("policies/*/model.pt")]
    assert (
        len(sizes) == 2 and max(sizes) < 0.25 * (out / "policies/sac-200/model.pt").stat().st_size
    )
    capsys.readouterr()
    fresh = tmp_path / "fresh"
    again = [fresh if word == str(out) else word for word in args]

    def no_sac(*_, **__):
        raise AssertionError("SAC trained again")

    monkeypatch.setattr("d3rlpy.algos.SAC.fit_online", no_sac)
    assert main([str(word) for word in again] + ["--policies", str(kept)]) == 0
    assert "SAC is not trained again" in capsys.readouterr().out
    for made in out.glob("*.npz"):
        assert (fresh / made.name).read_bytes() == made.read_bytes()
    other = [str(word) for word in again] + ["--policies", str(kept), "--out", str(tmp_path / "x")]
    assert main(other + ["--seed", "3"]) == 2
    assert "its policies were made with other settings: seed 3 (kept: 0)" in capsys.readouterr().err


def test_only_an_algorithm_with_a_policy_network_is_kept_as_a_policy(hopper_dataset, tmp_path):
    """BC's network is an imitator, not a policy; an algorithm not built yet has none at all:
    both are refused by name and leave no file behind."""
    import d3rlpy

    from lmencoders.saving import save_policy

    bc = d3rlpy.algos.BCConfig().create(device="cpu")
    with pytest.raises(ConfigError, match="BC has no policy network"):
        save_policy(bc, tmp_path / "unbuilt")
    bc.build_with_dataset(hopper_dataset)
    with pytest.raises(ConfigError, match="BC has no policy network"):
        save_policy(bc, tmp_path / "bc")
    assert not list(tmp_path.iterdir())


def test_collect_skips_finished_stages(collected):
    out, args = collected
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.npz")}
    stamps |= {p: p.stat().st_mtime_ns for p in out.rglob("model.*")}
    assert len(stamps) > 4
    record = json.loads((out / "collect.json").read_text())
    assert main(args) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert json.loads((out / "collect.json").read_text())["datasets"] == record["datasets"]


def test_collect_remakes_a_file_recorded_from_another_policy(collected):
    out, args = collected
    record_path = out / "collect.json"
    record = json.loads(record_path.read_text())
    stale, kept = out / "Hopper-v5-low-3-train.npz", out / "Hopper-v5-high-3-train.npz"
    picked = record["datasets"][stale.name]["policy_step"]
    record["datasets"][stale.name]["policy_step"] = -1  # as if an earlier pick made it
    record_path.write_text(json.dumps(record))
    stamps = {p: p.stat().st_mtime_ns for p in (stale, kept)}
    data = read_neorl_file(stale)
    assert main(args) == 0
    assert stale.stat().st_mtime_ns != stamps[stale]  # made again, from the picked policy
    assert np.array_equal(read_neorl_file(stale).obs, data.obs)  # same policy and seeds
    assert kept.stat().st_mtime_ns == stamps[kept]
    assert json.loads(record_path.read_text())["datasets"][stale.name]["policy_step"] == picked


def test_collect_remakes_every_file_when_its_record_is_unreadable(collected, capsys):
    out, args = collected
    files = sorted(out.glob("*.npz"))
    stamps = {p: p.stat().st_mtime_ns for p in files}
    (out / "collect.json").write_text("{not json")
    assert main(args) == 0
    assert all(p.stat().st_mtime_ns != stamps[p] for p in files)  # no source known: remade
    assert json.loads((out / "collect.json").read_text())["datasets"].keys() == {
        p.name for p in files
    }
    assert main(args + ["--selection-episodes", "-1"]) == 2
    assert "selection_episodes" in capsys.readouterr().err


def test_collect_finrl_with_standardised_sac_inputs(tmp_path):
    args = ["collect", "--env", "finance", "--out", str(tmp_path), "--sac-steps", "200"]
    args += ["--checkpoint-every", "100", "--eval-episodes", "1", "--levels", "low"]
    args += ["--train", "2", "--val", "1", "--max-episode-steps", "20", "--scale-observations"]
    assert main(args) == 0
    data = read_neorl_file(tmp_path / "finance-low-2-train.npz")
    assert data.obs.shape == (40, 181) and np.isfinite(data.reward).all()
    sac = load_model(tmp_path / "policies" / "sac-100")
    scaler = sac.config.observation_scaler
    assert scaler.mean[0] > 1e4 and scaler.std[0] > 1e4  # cash, in dollars
    assert json.loads((tmp_path / "collect.json").read_text())["config"]["scale_observations"]


def test_policies_are_picked_at_their_fraction_of_the_best_return():
    history = [
        {"step": s, "return": r} for s, r in [(1, 90), (2, 260), (3, 480), (4, 1000), (5, 760)]
    ]
    picked = pick_policies(history, ("low", "medium", "high"))
    assert {k: v["step"] for k, v in picked.items()} == {"low": 2, "medium": 3, "high": 5}
    # a checkpoint evaluated again is judged by that return (the best and the fractions too)
    history[4]["selection_return"] = 420.0  # step 5 was lucky in its few episodes
    history[3]["selection_return"] = 800.0
    picked = pick_policies(history, ("low", "medium", "high"))
    assert {k: v["step"] for k, v in picked.items()} == {"low": 2, "medium": 5, "high": 3}


def test_train_then_evaluate(collected, tiny_lm, tmp_path, capsys):
    out, _ = collected
    assert (
        main(
            [
                "train",
                "--dataset",
                str(out / "Hopper-v5-low-3-train.npz"),
                "--model",
                tiny_lm,
                "--steps",
                "20",
                "--eval-every",
                "10",
                "--eval-episodes",
                "1",
                "--batch-size",
                "16",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "evaluated return on Hopper-v5 over 1 episodes" in printed
    [result_file] = list(tmp_path.rglob("result.json"))
    result = json.loads(result_file.read_text())
    assert np.isfinite(result["evaluation"]["mean_return"])
    curve = (result_file.parent / "environment.csv").read_text().strip().splitlines()
    assert [row.split(",")[1] for row in curve] == ["10", "20"]
    # the final periodic evaluation (of the final policy) is the run's result
    assert float(curve[-1].split(",")[2]) == pytest.approx(result["evaluation"]["mean_return"])
    assert (tmp_path / "tensorboard").is_dir()
    assert main(["evaluate", result["model"], "--env", "Hopper-v5", "--episodes", "1"]) == 0
    assert "normalised score" in capsys.readouterr().out


def test_steps_are_whole_evaluation_epochs_or_evaluated_at_the_end(collected, tmp_path, capsys):
    out, _ = collected
    dataset = str(out / "Hopper-v5-low-3-train.npz")
    args = ["train", "--dataset", dataset, "--encoder", "vector", "--out", str(tmp_path)]
    assert main(args + ["--steps", "25", "--eval-every", "10"]) == 2
    assert "steps (25) must be a multiple of eval_every (10)" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    # any step count without periodic evaluation: the final policy is evaluated once
    assert main(args + ["--steps", "25", "--eval-every", "0", "--eval-episodes", "2"]) == 0
    assert "evaluated return on Hopper-v5 over 2 episodes" in capsys.readouterr().out
    # the learning curve on the first episode, the result (the last evaluation) on all three
    curve = ["--steps", "20", "--eval-every", "10", "--eval-episodes", "3"]
    assert main(args + curve + ["--curve-episodes", "4"]) == 2
    assert "curve_episodes (4) must be <= eval_episodes (3)" in capsys.readouterr().err
    assert main(args + curve + ["--curve-episodes", "1"]) == 0
    printed = capsys.readouterr().out
    assert "step 10: return on Hopper-v5 over 1 episodes" in printed
    assert "step 20: return on Hopper-v5 over 3 episodes" in printed
    (result,) = [
        json.loads(p.read_text())
        for p in tmp_path.glob("*/result.json")
        if json.loads(p.read_text())["config"]["curve_episodes"] == 1
    ]
    assert result["evaluation"]["episodes"] == 3


def test_describe_prints_text_and_token_count(tiny_lm, capsys):
    assert main(["describe", "--description", "hopper", "--model", tiny_lm]) == 0
    text, count = capsys.readouterr().out.strip().splitlines()
    assert text.startswith("x position: ") and count.startswith("(") and "tokens" in count


def one_run_grid(collected, out) -> tuple[list[str], str]:
    """An ``experiment`` command of one short BC run writing under ``out``, and its run name."""
    from lmencoders.cli import build_parser
    from lmencoders.experiments import ExperimentConfig, grid_run_names
    from lmencoders.options import from_args

    data, _ = collected
    args = ["experiment", "--datasets", str(data / "Hopper-v5-low-3-train.npz")]
    args += ["--methods", "BC", "--seeds", "0", "--steps", "10", "--eval-every", "10"]
    args += ["--eval-episodes", "1", "--out", str(out)]
    (name,) = grid_run_names(from_args(ExperimentConfig, build_parser().parse_args(args)))
    return args, name


def test_a_run_that_another_lane_is_running_is_left_to_it(collected, tmp_path, capsys):
    """Two lanes of one grid: a run that the other lane holds is neither started again in a
    fresh folder nor counted as finished; the rest run."""
    from lmencoders.resume import held

    args, name = one_run_grid(collected, tmp_path / "exp")
    busy = tmp_path / "exp" / "runs" / f"{name}-1"
    busy.mkdir(parents=True)
    with held(busy):  # as the other lane, running it
        assert main(args) == 0
        assert "runs done 0, already finished 0, running in another process 1" in (
            capsys.readouterr().out
        )
        assert [p.name for p in busy.parent.iterdir()] == [busy.name]
    assert main(args) == 0  # that lane was killed: its run is taken up
    assert "runs done 1," in capsys.readouterr().out


def test_a_run_that_another_lane_has_just_taken_is_left_to_it(collected, tmp_path, capsys):
    """Two lanes that reach a run together (as when both waited for one precompute): the
    lane that takes it first runs it, and the other, finding no run folder yet (the first is
    still loading its data), neither starts it in a second folder nor counts it as to start."""
    from lmencoders.experiments import CLAIMS
    from lmencoders.resume import held

    args, name = one_run_grid(collected, tmp_path / "exp")
    with held(tmp_path / "exp" / CLAIMS / name) as mine:  # the other lane, loading its data
        assert mine
        assert main([*args, "--dry-run"]) == 0
        assert "finished 0, running 1, to continue 0, to start 0" in capsys.readouterr().out
        assert main(args) == 0
        assert "runs done 0, already finished 0, running in another process 1" in (
            capsys.readouterr().out
        )
        assert not (tmp_path / "exp" / "runs").exists()
    assert main(args) == 0  # that lane was killed before its run began: the run is taken up
    assert "runs done 1," in capsys.readouterr().out
    assert main(args) == 0
    assert "runs done 0, already finished 1, running in another process 0" in (
        capsys.readouterr().out
    )


def test_bad_input_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "x.npz").write_bytes(b"not a zip")
    assert main(["precompute", str(tmp_path / "x.npz"), "--description", "hopper"]) == 2
    assert "x.npz: unreadable .npz file" in capsys.readouterr().err


def test_experiment_runs_in_resumable_parts_and_reports(
    collected, tiny_lm, tmp_path, capsys, monkeypatch
):
    out, _ = collected
    dataset = str(out / "Hopper-v5-low-3-train.npz")
    args = [
        "experiment",
        "--datasets",
        dataset,
        "--methods",
        "BC",
        "TD3+BC LM-No-Tune",
        "--seeds",
        "0",
        "1",
        "--steps",
        "20",
        "--eval-every",
        "10",
        "--eval-episodes",
        "2",
        "--curve-episodes",
        "1",
        "--batch-size",
        "16",
        "--model",
        tiny_lm,
        "--out",
        str(tmp_path / "exp"),
    ]
    assert main(args + ["--dry-run"]) == 0  # where each run stands; nothing runs or is logged
    listed = capsys.readouterr().out
    assert "to start: [TD3+BC LM-No-Tune] Hopper-v5-low-3-train.npz seed 1" in listed
    assert "finished 0, running 0, to continue 0, to start 4" in listed
    assert not (tmp_path / "exp").exists()
    assert main(args + ["--time-budget", "0"]) == 0  # budget spent: nothing new starts
    done = (
        "runs done {}, already finished {}, running in another process 0, left for a later part {}"
    )
    assert done.format(0, 0, 4) in capsys.readouterr().out
    assert main(args + ["--seeds", "0"]) == 0  # a first part
    assert done.format(2, 0, 0) in capsys.readouterr().out
    assert main(args) == 0  # the rest; finished runs are skipped
    assert done.format(2, 2, 0) in capsys.readouterr().out
    lm_run = next((tmp_path / "exp" / "runs").glob("*lm-frozen-seed0-*/result.json"))
    lm_result = json.loads(lm_run.read_text())
    assert lm_result["config"]["model"] == tiny_lm
    assert 0 < lm_result["evaluation_seconds"] < lm_result["train_seconds"]
    assert re.search(r", \d+ threads?$", lm_result["hardware"])  # trained on the CPU
    results = tmp_path / "RESULTS.md"
    monkeypatch.chdir(tmp_path)  # as in a repository: recorded paths under it become relative
    (tmp_path / "bench.md").write_text("# A benchmark\n\n![curves](curves.png)\n")
    report = ["report", "--out", str(tmp_path / "exp"), "--results", str(results)]
    stale = [
        tmp_path / "results" / "curves-gone-30-train.png",
        tmp_path / "exp" / "curves-gone-30-train.png",
    ]
    for picture in stale:  # an earlier report's, of runs since moved away
        picture.parent.mkdir(exist_ok=True)
        picture.write_bytes(b"png")
    assert main(report + ["--sections", "bench.md"]) == 0
    assert not any(picture.exists() for picture in stale)
    text = results.read_text()
    assert text.index("## A benchmark") < text.index("## The paper's numbers")
    assert "--out exp" in text and f"--out {tmp_path}" not in text
    assert "| Hopper-v5-low-3-train | 3 | BC |" in text and "TD3+BC LM-No-Tune" in text
    cell = next(line for line in text.splitlines() if "| Hopper-v5-low-3-train | 3 | BC |" in line)
    assert re.search(r"\| \d+\.\d \(\d+%\) \| .+ threads? \|$", cell)  # minutes, evaluating share
    assert "| 2 (curve 1) |" in cell  # the result's episodes, and the curve's
    summary = next(line for line in text.splitlines() if line.startswith("| Hopper-v5-low-3"))
    assert summary.count("(2)") == 2  # one cell per method, 2 seeds each
    commands = text.split("```")[1]  # the exact commands are recorded...
    assert commands.count("lmencoders experiment --datasets") == 2
    assert "--time-budget 0" not in commands  # ...but not a part that made no run
    assert lm_result["command"].replace(f"{tmp_path}{os.sep}", "") in commands
    log = tmp_path / "exp" / "experiment.json"
    logged = log.read_text()
    log.unlink()  # runs made on another machine: each brings its own command
    assert main(report) == 0
    assert results.read_text().split("```")[1] == commands
    for record in (tmp_path / "exp" / "runs").glob("*/result.json"):  # runs from before that
        record.write_text(json.dumps(json.loads(record.read_text()) | {"command": None}))
    log.write_text(logged)
    assert main(report) == 0  # fall back on the logged calls whose grid holds them
    commands = results.read_text().split("```")[1]
    assert commands.count("lmencoders experiment --datasets") == 2  # one without its budget
    assert "--time-budget" not in commands
    data_file = collected[0] / "Hopper-v5-low-3-train.npz"
    md5 = hashlib.md5(data_file.read_bytes()).hexdigest()
    assert f"- `Hopper-v5-low-3-train.npz` (md5 {md5}): `lmencoders collect --env Hopper-v5" in text
    assert (tmp_path / "results" / "curves-Hopper-v5-low-3-train.png").stat().st_size > 1000
    assert "## Statistics (rliable" in text and "| Hopper-v5-low-3-train | BC | 2 |" in text
    # one attribution picture per task and LM method, from its first seed's run
    assert "- **Hopper-v5-low-3-train, TD3+BC LM-No-Tune** (seed 0, gradient x input, " in text
    picture = tmp_path / "results" / "explain-Hopper-v5-low-3-train-td3-bc-lm-no-tune.png"
    assert picture.stat().st_size > 1000 and f"(results/{picture.name})" in text
    rows = (tmp_path / "results" / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 4


def test_experiment_precomputes_mean_and_segments_in_one_lm_pass(
    collected, tiny_lm, tmp_path, monkeypatch
):
    """LM-No-Tune and LM-Segments on one dataset: the dataset goes through the LM once, and
    each run then reads its table from the cache; a run without an LM does not wait for it."""
    from lmencoders import load_description
    from lmencoders.envs import description_for
    from lmencoders.features import FrozenFeatures, clear_feature_caches

    monkeypatch.setenv("LMENCODERS_CACHE", str(tmp_path / "cache"))  # nothing computed before
    clear_feature_caches()
    calls: list[tuple[str, int]] = []
    finished_before: list[int] = []  # finished runs when the LM pass started
    runs = tmp_path / "exp" / "runs"
    for name in ("compute", "compute_with"):
        original = getattr(FrozenFeatures, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            codes = args[1] if _name == "compute_with" else args[0]
            calls.append((_name, len(codes)))
            finished_before.append(len(list(runs.glob("*/result.json"))))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(FrozenFeatures, name, spy)
    dataset = collected[0] / "Hopper-v5-low-3-train.npz"
    methods = ["TD3+BC", "TD3+BC LM-No-Tune", "TD3+BC LM-Segments"]
    args = ["experiment", "--datasets", str(dataset), "--methods", *methods, "--seeds", "0"]
    args += ["--steps", "4", "--eval-every", "0", "--eval-episodes", "1", "--batch-size", "8"]
    assert main(args + ["--model", tiny_lm, "--out", str(tmp_path / "exp")]) == 0
    description = load_description(description_for("Hopper-v5", 12))
    data = read_neorl_file(dataset)
    assert data.done.any()  # so the tables hold d3rlpy's zero next observation of terminals
    obs = np.concatenate([data.obs, np.zeros_like(data.obs[:1])])
    distinct = len(np.unique(description.quantize(obs), axis=0))
    assert calls[0] == ("compute_with", distinct)
    assert [c for c in calls if c[1] >= distinct] == [calls[0]]  # after it, evaluations only
    assert finished_before[0] == 1  # the plain TD3+BC run came first
    assert len(list(runs.glob("*/result.json"))) == 3


def test_levels_from_one_checkpoint_are_announced_and_warned(capsys):
    from lmencoders.collect import _announce, shared_checkpoints

    history = [{"step": 200, "return": 10.0}, {"step": 400, "return": 11.0}]
    chosen = pick_policies(history, ("low", "medium", "high"))
    assert shared_checkpoints(chosen) == {200: ["low", "medium"], 400: ["high"]} or (
        shared_checkpoints(chosen) and all(len(v) > 1 for v in shared_checkpoints(chosen).values())
    )
    with pytest.warns(UserWarning, match=r"all come from the same SAC checkpoint \(step \d+\)"):
        _announce(chosen)
    printed = capsys.readouterr().out
    assert "low: SAC step" in printed and "high: SAC step" in printed


def test_collect_records_shared_checkpoints(collected):
    out, _ = collected
    record = json.loads((out / "collect.json").read_text())
    levels = {name: d["policy_step"] for name, d in record["datasets"].items() if "train" in name}
    shared = record["shared_checkpoints"]
    if len(set(levels.values())) < len(levels):
        assert shared
    else:
        assert shared == {}


def _subcommands(parser):
    import argparse

    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_option_has_help_and_shows_its_default():
    import argparse

    from lmencoders.cli import build_parser

    for name, sub in _subcommands(build_parser()).items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
            has_default = (
                action.default not in (None, "", argparse.SUPPRESS) and not action.required
            )
            if has_default and action.option_strings:
                assert "(default: " in action.help, f"{name} {action.option_strings}"
        text = sub.format_help()
        assert "%%" not in text and "%(" not in text, name


def test_the_cli_and_the_configs_share_their_defaults():
    import dataclasses

    from lmencoders.cli import build_parser
    from lmencoders.collect import CollectConfig
    from lmencoders.experiments import ExperimentConfig
    from lmencoders.options import from_args
    from lmencoders.train import TrainConfig

    commands = _subcommands(build_parser())
    for name, cls in [("train", TrainConfig), ("collect", CollectConfig)]:
        assert from_args(cls, commands[name].parse_args([])) == cls()
        assert {f.name for f in dataclasses.fields(cls)} <= set(vars(commands[name].parse_args([])))
    args = commands["experiment"].parse_args(["--datasets", "a.npz"])
    assert from_args(ExperimentConfig, args) == ExperimentConfig(datasets=["a.npz"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["precompute", "x.npz", "--batch-size", "-1"], "batch_size must be a positive integer"),
        (["collect", "--train", "0"], "train_trajectories must be a positive integer"),
        (["collect", "--checkpoint-every", "-5"], "checkpoint_every must be a positive integer"),
        (["describe", "--rows", "0"], "rows must be a positive integer"),
        (["evaluate", "run", "--episodes", "0"], "episodes must be a positive integer"),
        (["experiment", "--datasets", "a.npz", "--steps", "0"], "steps must be a positive"),
        (["experiment", "--datasets", "a.npz", "--seeds", "-1"], "seeds[] must be an integer >= 0"),
    ],
)
def test_bad_counts_on_the_command_line_are_one_line_errors(
    argv, message, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_sac_resumes_from_its_last_checkpoint_after_dying(tmp_path, monkeypatch, capsys):
    import lmencoders.collect as collect_module
    from lmencoders.collect import CollectConfig, train_behaviour_policies

    config = CollectConfig(
        env="Hopper-v5",
        out_dir=str(tmp_path),
        sac_steps=600,
        checkpoint_every=200,
        eval_episodes=1,
        train_trajectories=1,
        val_trajectories=0,
        max_episode_steps=20,
    )
    original = collect_module.save_model
    saved = []

    def dies_at_the_third(algo, folder):
        if len(saved) == 2:
            raise KeyboardInterrupt  # the machine went away
        saved.append(folder)
        return original(algo, folder)

    monkeypatch.setattr(collect_module, "save_model", dies_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        train_behaviour_policies(config, tmp_path)
    progress = json.loads((tmp_path / "sac-progress.json").read_text())
    assert [h["step"] for h in progress] == [200, 400]
    assert (tmp_path / "sac-buffer.h5").is_file() and not (
        tmp_path / "sac-checkpoints.json"
    ).exists()
    kept = (tmp_path / "policies" / "sac-200" / "model.pt").read_bytes()
    monkeypatch.setattr(collect_module, "save_model", original)
    history = train_behaviour_policies(config, tmp_path)
    assert "resuming SAC after step 400" in capsys.readouterr().out
    assert [h["step"] for h in history] == [200, 400, 600] and history[:2] == progress
    assert (tmp_path / "policies" / "sac-200" / "model.pt").read_bytes() == kept
    assert not (tmp_path / "sac-buffer.h5").exists()  # finished: only the policies stay
    assert train_behaviour_policies(config, tmp_path) == history  # finished stage is skipped


def test_sac_stops_at_the_return_asked_for(tmp_path):
    from lmencoders.collect import CollectConfig, train_behaviour_policies

    config = CollectConfig(
        env="Hopper-v5",
        out_dir=str(tmp_path),
        sac_steps=600,
        checkpoint_every=200,
        eval_episodes=1,
        max_episode_steps=20,
        stop_at_return=-1e9,
    )
    assert [h["step"] for h in train_behaviour_policies(config, tmp_path)] == [200]


def test_sac_reads_gymnasium_observations_and_the_data_keep_x(tmp_path):
    """SAC's inputs leave out NeoRL's leading x position; the rollouts record it, and the
    recorded actions are the policy's on the observation without it."""
    from lmencoders.collect import CollectConfig, rollout, train_behaviour_policies
    from lmencoders.envs import make_env

    settings = dict(
        env="Hopper-v5", sac_steps=200, checkpoint_every=200, eval_episodes=1,
        max_episode_steps=20,
    )  # fmt: skip
    history = train_behaviour_policies(CollectConfig(out_dir=str(tmp_path), **settings), tmp_path)
    sac = load_model(tmp_path / history[0]["path"])
    assert list(sac.impl.observation_shape) == [11]
    data = rollout(sac, make_env("Hopper-v5"), trajectories=2, max_steps=20,
                   sample_probability=0.0, seed=3)  # fmt: skip
    assert data["obs"].shape[1] == 12 and (data["obs"][1:, 0] != data["obs"][0, 0]).any()
    np.testing.assert_allclose(data["action"], sac.predict(data["obs"][:, 1:]), atol=1e-6)
    with pytest.raises(ConfigError, match="reads 11 observation entries, the environment gives 18"):
        rollout(sac, make_env("Walker2d-v5"), trajectories=1, max_steps=2,
                sample_probability=0.0, seed=0)  # fmt: skip

    with_x = tmp_path / "with-x"
    config = CollectConfig(out_dir=str(with_x), sac_sees_positions=True, **settings)
    history = train_behaviour_policies(config, with_x)
    assert load_model(with_x / history[0]["path"]).impl.observation_shape == [12]
    (with_x / "sac-checkpoints.json").unlink()  # as if it had been interrupted
    config.sac_sees_positions = False
    config.sac_steps = 400
    with pytest.raises(ConfigError, match="--sac-sees-positions"):
        train_behaviour_policies(config, with_x)


def test_a_ledger_keeps_the_grid_after_its_run_folders_are_gone(
    collected, tiny_lm, tmp_path, capsys, monkeypatch
):
    """Machines are reset. With --ledger, the report made after the run folders are deleted is
    the report made before (tables, curves, attribution picture), the experiment counts the
    recorded runs as finished, records name no folder of the machine, and a record made from
    another draw of the dataset file is reported as that draw's and run again."""
    out, _ = collected
    monkeypatch.chdir(tmp_path)
    dataset = out / "Hopper-v5-low-3-train.npz"
    grid = ["experiment", "--datasets", str(dataset), "--methods", "TD3+BC", "TD3+BC LM-No-Tune",
            "--seeds", "0", "--steps", "20", "--eval-every", "10", "--eval-episodes", "1",
            "--batch-size", "16", "--model", tiny_lm, "--out", "exp",
            "--ledger", "ledger"]  # fmt: skip
    report = ["report", "--out", "exp", "--results", "RESULTS.md", "--ledger", "ledger"]
    assert main(grid) == 0 and main(report) == 0
    before = Path("RESULTS.md").read_text()
    assert f"; made on {made_on()}\n" in before
    pictures = sorted(p.name for p in Path("results").glob("*.png"))
    assert "explain-Hopper-v5-low-3-train-td3-bc-lm-no-tune.png" in pictures
    records = sorted(Path("ledger/runs").glob("*.json"))
    assert len(records) == 2 and not any(str(tmp_path) in r.read_text() for r in records)
    lm = json.loads(next(r for r in records if "lm-frozen" in r.name).read_text())
    assert len(lm["curve"]) == 2 and lm["explanation"]["method"] == "gradient x input"
    assert lm["dataset_md5"] == hashlib.md5(dataset.read_bytes()).hexdigest()
    shutil.rmtree("exp")
    assert main(report) == 0
    assert Path("RESULTS.md").read_text() == before
    assert sorted(p.name for p in Path("results").glob("*.png")) == pictures
    capsys.readouterr()
    assert main(grid + ["--dry-run"]) == 0
    assert "finished 2, running 0, to continue 0, to start 0" in capsys.readouterr().out
    assert main(grid + ["--time-budget", "0"]) == 0
    assert "runs done 0, already finished 2" in capsys.readouterr().out
    vector = next(r for r in records if "lm-frozen" not in r.name)
    vector.write_text(json.dumps(json.loads(vector.read_text()) | {"dataset_md5": "0" * 32}))
    from lmencoders.ledger import Ledger

    kept = Ledger("ledger")  # the earlier draw's file record, as a remade file would leave it
    drawn = kept.datasets()[dataset.name] | {"md5": "0" * 32, "mean_return": 1.0}
    kept.add_datasets({dataset.name: drawn})
    assert main(report) == 0
    text = Path("RESULTS.md").read_text()  # its own row, out of the aggregates over tasks
    assert 'Rows named "earlier draw" hold 1 runs whose dataset file was made again' in text
    cell = "| Hopper-v5-low-3-train | 3 | TD3+BC |"
    assert cell in before and cell not in text
    assert "| Hopper-v5-low-3-train (earlier draw 00000000) | 3 | TD3+BC |" in text
    assert f"- `{dataset.name}` (earlier draw 00000000) (md5 {'0' * 32}): `lmencoders" in text
    assert kept.dataset(dataset.name, "0" * 32) == drawn  # the file here is recorded again
    away = dataset.rename(tmp_path / "away.npz")  # a fresh clone: the ledger names the draws
    try:
        assert main(report) == 0
    finally:
        away.rename(dataset)
    assert Path("RESULTS.md").read_text() == text
    capsys.readouterr()
    assert main(grid + ["--dry-run"]) == 0
    assert "finished 1, running 0, to continue 0, to start 1" in capsys.readouterr().out
    vector.write_text("{not json")
    assert main(report) == 2
    assert f"{vector}: unreadable ledger file" in capsys.readouterr().err


def test_report_attributions_name_a_dataset_that_is_not_here(tmp_path):
    """RESULTS.md made on a machine without a run's dataset says so instead of failing."""
    from lmencoders.report import _attributions

    config = {"dataset": "data/elsewhere/Hopper-v5-low-99-train.npz", "algo": "td3+bc"}
    config |= {"encoder": "lm", "tuning": "frozen", "pooling": "segments", "seed": 1}
    runs = [(tmp_path / "run", {"config": config, "run": "run"})]
    section = _attributions(runs, tmp_path / "results", None)  # neither run nor explanation
    assert "- Hopper-v5-low-99-train, TD3+BC LM-Segments: no picture, no run of it " in section
    (tmp_path / "run").mkdir()
    section = _attributions(runs, tmp_path / "results", None)
    assert section.startswith("## Which pieces the policy reads")
    assert "- Hopper-v5-low-99-train, TD3+BC LM-Segments: no picture, " in section
    assert "`data/elsewhere/Hopper-v5-low-99-train.npz` is not on this machine" in section
    vector = config | {"encoder": "vector"}  # runs without an LM have nothing to explain
    assert (
        _attributions([(tmp_path / "run", {"config": vector, "run": "run"})], tmp_path, None) == ""
    )


def test_report_counts_only_the_newest_attempt_of_a_configuration(tmp_path):
    """A rerun (``name-2``) replaces its first attempt in the report instead of adding a seed,
    and neither attempt's command is shown twice."""
    from lmencoders.report import _commands, _finished_runs

    name = "Hopper-v5-low-3-train-bc-vector-seed0-0123abcd"
    for folder, command in [(name, "lmencoders a"), (f"{name}-2", "lmencoders b")]:
        (tmp_path / "runs" / folder).mkdir(parents=True)
        record = {"run": folder, "command": command}
        (tmp_path / "runs" / folder / "result.json").write_text(json.dumps(record))
    runs = _finished_runs(tmp_path)
    assert [result["run"] for _, result in runs] == [f"{name}-2"]
    assert _commands(tmp_path, runs) == ["lmencoders b"]


def test_a_ledger_keeps_the_newest_attempt_and_names_a_bad_record(tmp_path):
    """An older attempt's record never replaces a newer one's, a run or dataset made again on
    another draw keeps the earlier one's record, and a run record that lacks what a report
    reads is refused by file."""
    from lmencoders.ledger import Ledger, LedgerError

    ledger = Ledger(tmp_path)
    name = "Hopper-v5-low-3-train-bc-vector-seed0-0123abcd"
    record = {"config": {}, "evaluation": {}, "dataset_trajectories": 3, "dataset_mean_return": 1}
    ledger.add(record | {"run": f"{name}-2"})
    ledger.add(record | {"run": name})
    assert [r["run"] for r in ledger.records()] == [f"{name}-2"]
    assert ledger.get(name)["run"] == f"{name}-2"
    (tmp_path / "runs" / f"{name}.json").unlink()
    drawn_again = record | {"run": name, "dataset_md5": "b" * 32}  # same settings, new file
    ledger.add(record | {"run": f"{name}-3", "dataset_md5": "a" * 32})
    ledger.add(drawn_again)
    assert sorted(r["run"] for r in ledger.records()) == [name, f"{name}-3"]
    assert ledger.get(name) == drawn_again
    ledger.add_datasets({"a.npz": {"md5": "1"}})
    ledger.add_datasets({"a.npz": {"md5": "2"}})  # made again: the runs on the first keep it
    assert ledger.datasets() == {"a.npz": {"md5": "2"}, "a.npz@1": {"md5": "1"}}
    bad = tmp_path / "runs" / f"{name}.json"
    bad.write_text(json.dumps({"run": name, "config": {}}))
    with pytest.raises(LedgerError, match=f"{bad}: the run record has no evaluation, "):
        ledger.records()
