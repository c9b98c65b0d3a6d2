"""`lmencoders train` and its records: runs never destroy runs, models load without running
code, one cache entry per dataset, progress and cost shown (real d3rlpy, real MuJoCo)."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import neorl_arrays, quick_run

from lmencoders.cli import main
from lmencoders.errors import ConfigError
from lmencoders.saving import load_model
from lmencoders.train import TrainConfig, evaluate, run_name, train

ROOT = Path(__file__).resolve().parents[1]

config = quick_run


def snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_rerun_never_destroys_a_finished_run(data_file, tmp_path):
    first = train(config(data_file, tmp_path))
    first_dir = tmp_path / first["run"]
    before = snapshot(first_dir)
    assert {"result.json", "model.json", "model.pt"} <= set(before)
    second = train(config(data_file, tmp_path))
    assert second["run"] == first["run"] + "-2"
    assert snapshot(first_dir) == before


def test_a_failing_rerun_keeps_the_old_run_and_saves_its_model_before_evaluating(
    data_file, tmp_path, monkeypatch
):
    import lmencoders.train as train_module

    first = train(config(data_file, tmp_path))
    before = snapshot(tmp_path / first["run"])

    def broken(*args, **kwargs):
        raise RuntimeError("the simulator crashed")

    monkeypatch.setattr(train_module, "_evaluation", broken)
    with pytest.raises(RuntimeError, match="simulator crashed"):
        train(config(data_file, tmp_path))
    assert snapshot(tmp_path / first["run"]) == before
    failed = tmp_path / (first["run"] + "-2")
    assert (failed / "model.pt").is_file() and not (failed / "result.json").exists()
    monkeypatch.undo()
    trained = load_model(failed)  # the training of the failed run is not lost
    assert trained.predict(neorl_arrays(1, steps=2)["obs"]).shape == (2, 3)


def test_different_settings_go_to_different_folders(data_file, tmp_path):
    a = train(config(data_file, tmp_path))
    b = train(config(data_file, tmp_path, steps=20))
    c = train(config(data_file, tmp_path, batch_size=8))
    assert len({a["run"], b["run"], c["run"]}) == 3
    assert not any(r["run"].endswith("-2") for r in (a, b, c))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"steps": 0}, "steps must be a positive integer, got 0"),
        ({"batch_size": -1}, "batch_size must be a positive integer, got -1"),
        ({"eval_episodes": 0}, "eval_episodes must be a positive integer"),
        ({"train_num": -3}, "train_num must be a positive integer"),
        ({"eval_every": -10}, "eval_every must be an integer >= 0"),
    ],
)
def test_bad_sizes_are_refused_before_anything_is_written(data_file, tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        config(data_file, tmp_path, **changes)
    flag = "--" + next(iter(changes)).replace("_", "-")
    args = ["train", "--dataset", str(data_file), "--out", str(tmp_path), flag]
    assert main(args + [str(next(iter(changes.values())))]) == 2
    assert not list(tmp_path.iterdir())


def test_evaluate_loads_the_safe_pair_and_refuses_pickles(data_file, tmp_path, capsys):
    result = train(config(data_file, tmp_path / "runs"))
    run = tmp_path / "runs" / result["run"]
    algo = load_model(run)
    obs = neorl_arrays(1, steps=5)["obs"]
    saved_config = json.loads((run / "model.json").read_text())
    assert saved_config["config"]["type"] == "td3_plus_bc"
    again = load_model(run / "model.pt")
    assert np.array_equal(algo.predict(obs), again.predict(obs))
    assert main(["evaluate", str(run), "--episodes", "1"]) == 0  # env from result.json
    assert "evaluated return on Hopper-v5 over 1 episodes" in capsys.readouterr().out

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    crafted = tmp_path / "crafted.d3"
    crafted.write_bytes(pickle.dumps({"version": "2.8.1", "config": Payload()}))
    assert main(["evaluate", str(crafted), "--env", "Hopper-v5"]) == 2
    assert "a .d3 file is a pickle" in capsys.readouterr().err and not marker.exists()

    weights = run / "model.pt"
    torch.save({"policy": Payload()}, weights)  # a crafted weights file
    assert main(["evaluate", str(run), "--episodes", "1"]) == 2
    assert "holds more than tensors" in capsys.readouterr().err and not marker.exists()


def test_precompute_then_train_reads_the_one_cache_entry(data_file, tmp_path, tiny_lm, lm_texts):
    from lmencoders.features import clear_feature_caches

    cache = tmp_path / "cache"
    args = ["precompute", str(data_file), "--model", tiny_lm, "--cache-dir", str(cache)]
    assert main(args) == 0
    computed = sum(lm_texts)
    assert computed > 50 and len(list(cache.iterdir())) == 1
    clear_feature_caches()  # as a new process
    import os

    os.environ["LMENCODERS_CACHE"], previous = str(cache), os.environ["LMENCODERS_CACHE"]
    try:
        train(config(data_file, tmp_path / "runs", encoder="lm", model=tiny_lm, steps=4))
    finally:
        os.environ["LMENCODERS_CACHE"] = previous
    assert len(list(cache.iterdir())) == 1
    # training looked every dataset row up; only the evaluation's new states met the LM
    assert sum(lm_texts) - computed <= 2 * 20 and max(lm_texts[1:], default=0) <= 2


def test_long_steps_show_progress_and_state_the_evaluation_cost(data_file, tmp_path, capsys):
    assert (
        main(
            [
                "train",
                "--dataset",
                str(data_file),
                "--encoder",
                "vector",
                "--steps",
                "4",
                "--eval-episodes",
                "2",
                "--batch-size",
                "8",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "evaluation on Hopper-v5: 2 episodes, up to 1000 steps each" in captured.out
    assert "evaluating 2 episodes" in captured.err  # the progress bar


def test_tensorboard_logs_are_nested_once(data_file, tmp_path):
    result = train(config(data_file, tmp_path, tensorboard=True))
    folder = tmp_path / "tensorboard" / "runs" / result["run"]
    assert list(folder.glob("events.out.tfevents.*"))
    assert not [p for p in folder.iterdir() if p.is_dir()]


def test_evaluate_function_validates_its_episode_count(data_file, tmp_path):
    algo = load_model(tmp_path / train(config(data_file, tmp_path))["run"])
    with pytest.raises(ConfigError, match="episodes must be a positive integer"):
        evaluate(algo, "Hopper-v5", 0)


def test_run_names_stay_when_settings_are_added():
    """Experiments resume by run name: a setting added later (here curve_episodes) must not
    rename the runs made before it, unless it is used. Names computed before it existed, on
    the data then shipped (a dataset is named by file name and size)."""
    earlier = str(ROOT / "benchmarks" / "data" / "hopper-sac60k" / "Hopper-v5-medium-30-train.npz")
    assert run_name(TrainConfig(dataset=earlier, steps=100, eval_every=50, seed=3)) == (
        "Hopper-v5-medium-30-train-td3+bc-lm-frozen-seed3-e0be2fca"
    )
    segments = TrainConfig(
        dataset=earlier, encoder="lm", tuning="frozen", pooling="segments", steps=100, seed=1
    )
    assert run_name(segments).endswith("-segments-seed1-6db62bb8")
    with_curve = TrainConfig(dataset=earlier, steps=100, eval_every=50, seed=3, curve_episodes=1)
    assert not run_name(with_curve).endswith("e0be2fca")
    standardized = TrainConfig(
        dataset=earlier, steps=100, eval_every=50, seed=3, standardize_features=True
    )
    assert run_name(standardized).startswith("Hopper-v5-medium-30-train-td3+bc-lm-frozen-")
    assert "-standardized-seed3-" in run_name(standardized)
    assert not run_name(standardized).endswith("e0be2fca")


def test_plas_trains_its_policy_in_the_second_half_of_a_short_run(data_file, tmp_path):
    """d3rlpy's PLAS warms its VAE up for 500,000 steps by default: a 10k-step run would end
    with an untrained actor. The warm-up is half of the run, and the actor then learns."""
    result = train(config(data_file, tmp_path, algo="plas", steps=10, eval_every=0))
    folder = tmp_path / result["run"]
    params = json.loads((folder / "params.json").read_text())
    assert params["config"]["params"]["warmup_steps"] == 5
    actor_losses = (folder / "actor_loss.csv").read_text().splitlines()
    assert [int(line.split(",")[1]) for line in actor_losses] == [10]


def test_bcq_samples_as_many_actions_as_asked_and_its_name_says_so(data_file, tmp_path):
    """d3rlpy's BCQ samples 100 actions per state, 10x the BCQ paper, and its update takes
    ~8.5x as long on CPU: ``action_samples`` sets the number, and the run, its name and its
    grid method (BCQ-10) keep it apart from d3rlpy's default."""
    from lmencoders.report import _method_of

    result = train(
        config(data_file, tmp_path, algo="bcq", steps=4, eval_every=0, action_samples=10)
    )
    assert "-bcq-10samples-vector-seed0-" in result["run"]
    params = json.loads((tmp_path / result["run"] / "params.json").read_text())
    assert params["config"]["params"]["n_action_samples"] == 10
    assert _method_of(result) == "BCQ-10"
    default = config(data_file, tmp_path, algo="bcq")
    assert "-bcq-vector-" in run_name(default)
    assert _method_of({"config": dataclasses.asdict(default)}) == "BCQ"


def test_action_samples_of_an_algorithm_that_samples_none_is_refused(data_file, tmp_path):
    with pytest.raises(ConfigError, match=r"action_samples applies to .*'bcq'.*not to 'td3\+bc'"):
        config(data_file, tmp_path, action_samples=10)
    with pytest.raises(ConfigError, match="action_samples must be a positive integer"):
        config(data_file, tmp_path, algo="cql", action_samples=0)
