"""A run killed after an epoch goes on from its checkpoint and ends exactly as the uninterrupted
run does: same weights and optimiser states, same logs (real d3rlpy, real MuJoCo)."""

from __future__ import annotations

import json
import time
import warnings

import pytest
import torch
from conftest import quick_run

import lmencoders.train as train_module
from lmencoders.resume import CHECKPOINT, held
from lmencoders.train import run_name, run_state, train


class Killed(Exception):
    """The process dying (a session ending), at a chosen point."""


def config(data_file, out, **changes):
    # a kill after epoch 3 (step 9, odd) breaks TD3's actor-every-2nd-step if the step is lost
    settings = dict(steps=12, eval_every=3, eval_episodes=2, curve_episodes=1)
    return quick_run(data_file, out, **(settings | changes))


def kill_at(monkeypatch, epoch: int, checkpoint_written: bool) -> None:
    """Kill the run at the end of ``epoch``, after d3rlpy logged it, with or without its
    checkpoint written."""
    real = train_module.save_checkpoint

    def dying(algo, folder, *, epoch: int, **state):
        if checkpoint_written or epoch != kill_epoch:
            real(algo, folder, epoch=epoch, **state)
        if epoch == kill_epoch:
            raise Killed

    kill_epoch = epoch
    monkeypatch.setattr(train_module, "save_checkpoint", dying)


def weights(run) -> dict:
    return torch.load(run / "model.pt", weights_only=True)


def assert_same(a, b) -> None:
    """Equal state dicts, tensors bit for bit (optimiser states included)."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def logs(run) -> dict[str, list[list[str]]]:
    """d3rlpy's CSV logs; a timing's value differs between runs, so only its epoch and step."""
    found = {}
    for csv in sorted(run.glob("*.csv")):
        rows = [line.split(",") for line in csv.read_text().splitlines()]
        found[csv.name] = [row[:2] for row in rows] if csv.name.startswith("time_") else rows
    return found


@pytest.mark.parametrize(
    "encoder, checkpoint_written",
    [("vector", True), ("vector", False), ("frozen", True), ("frozen", False), ("ln_embed", True)],
)
def test_a_killed_run_goes_on_and_ends_as_the_uninterrupted_run(
    data_file, tmp_path, monkeypatch, tiny_lm, encoder, checkpoint_written
):
    lm = {"encoder": "lm", "model": tiny_lm, "tuning": encoder} if encoder != "vector" else {}
    whole = train(config(data_file, tmp_path / "whole", **lm))
    whole_run = tmp_path / "whole" / whole["run"]

    kill_at(monkeypatch, 3, checkpoint_written)
    with pytest.raises(Killed):
        train(config(data_file, tmp_path / "killed", **lm))
    monkeypatch.undo()
    run = tmp_path / "killed" / whole["run"]
    assert (run / CHECKPOINT).is_file() and not (run / "result.json").exists()
    if not checkpoint_written:  # epoch 3 logged, its checkpoint not: logs run ahead of it
        assert max(int(row[0]) for row in logs(run)["environment.csv"]) == 3

    continued = train(config(data_file, tmp_path / "killed", **lm))
    assert continued["run"] == whole["run"]  # the same folder, not a fresh attempt
    assert not (run / CHECKPOINT).exists()
    assert continued["evaluation"] == whole["evaluation"]
    assert_same(weights(run), weights(whole_run))
    assert logs(run) == logs(whole_run)
    steps = [int(row[1]) for row in logs(run)["environment.csv"]]
    assert steps == [3, 6, 9, 12]
    tuned = [key for module in weights(run).values() for key in module if "lm_parameters" in key]
    assert bool(tuned) == (
        encoder == "ln_embed"
    )  # a tuned LM's tensors go on; a frozen one's never


@pytest.mark.parametrize("algo", ["bc", "plas", "bcq", "cql", "iql", "awac"])
def test_every_algorithm_continues_exactly(data_file, tmp_path, monkeypatch, algo):
    """PLAS's warm-up and the others' update schedules hang on the gradient step."""
    whole = train(config(data_file, tmp_path / "whole", algo=algo))
    kill_at(monkeypatch, 3, checkpoint_written=True)
    with pytest.raises(Killed):
        train(config(data_file, tmp_path / "killed", algo=algo))
    monkeypatch.undo()
    continued = train(config(data_file, tmp_path / "killed", algo=algo))
    assert continued["evaluation"] == whole["evaluation"]
    run, whole_run = tmp_path / "killed" / whole["run"], tmp_path / "whole" / whole["run"]
    assert_same(weights(run), weights(whole_run))
    # d3rlpy's gradient logs repeat a module's last gradient after it stops training (PLAS's
    # VAE after its warm-up); a continued run starts without gradients, so those rows differ
    losses = {name: rows for name, rows in logs(run).items() if not name.endswith("_grad.csv")}
    assert losses == {n: r for n, r in logs(whole_run).items() if not n.endswith("_grad.csv")}


def test_a_run_killed_in_its_final_evaluation_only_evaluates(data_file, tmp_path, monkeypatch):
    """eval_every=0: one epoch, then the evaluation (the costly part with a live LM)."""
    settings = dict(eval_every=0)
    whole = train(config(data_file, tmp_path / "whole", **settings))

    def broken(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(train_module, "_evaluation", broken)
    with pytest.raises(Killed):
        train(config(data_file, tmp_path / "killed", **settings))
    monkeypatch.undo()
    continued = train(config(data_file, tmp_path / "killed", **settings))
    run, whole_run = tmp_path / "killed" / whole["run"], tmp_path / "whole" / whole["run"]
    assert continued["evaluation"] == whole["evaluation"]
    assert_same(weights(run), weights(whole_run))
    assert logs(run) == logs(whole_run)  # one epoch's rows: no gradient step was taken again
    assert len(logs(run)["critic_loss.csv"]) == 1


def test_a_damaged_checkpoint_is_named_and_the_run_starts_afresh_beside_it(
    data_file, tmp_path, monkeypatch
):
    kill_at(monkeypatch, 1, checkpoint_written=True)
    with pytest.raises(Killed):
        train(config(data_file, tmp_path))
    monkeypatch.undo()
    name = run_name(config(data_file, tmp_path))
    damaged = tmp_path / name / CHECKPOINT
    damaged.write_bytes(damaged.read_bytes()[:100])
    kept = damaged.read_bytes()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(config(data_file, tmp_path))
    assert any(str(damaged) in str(w.message) for w in caught)
    assert result["run"] == name + "-2"
    assert damaged.read_bytes() == kept  # the damaged attempt is left as it was
    assert json.loads((tmp_path / result["run"] / "result.json").read_text())["evaluation"]


def test_a_run_being_continued_elsewhere_is_left_to_it(data_file, tmp_path, monkeypatch):
    """Two runs of the same settings at once: the second does not write into the folder that
    the first is continuing; it starts its own."""
    kill_at(monkeypatch, 1, checkpoint_written=True)
    with pytest.raises(Killed):
        train(config(data_file, tmp_path))
    monkeypatch.undo()
    name = run_name(config(data_file, tmp_path))
    busy = tmp_path / name
    before = {p.name: p.read_bytes() for p in busy.iterdir()}
    with held(busy) as free:  # as another process continuing it would
        assert free
        result = train(config(data_file, tmp_path))
    assert result["run"] == name + "-2"
    assert {p.name: p.read_bytes() for p in busy.iterdir()} == before
    assert train(config(data_file, tmp_path))["run"] == name + "-3"  # finished newest: fresh


def test_run_state_says_where_a_run_stands(data_file, tmp_path, monkeypatch):
    settings = config(data_file, tmp_path)
    assert run_state(settings) == ("to start", 0)
    kill_at(monkeypatch, 2, checkpoint_written=True)
    with pytest.raises(Killed):
        train(settings)
    monkeypatch.undo()
    folder = tmp_path / run_name(settings)
    (folder / "run.lock").unlink()  # as in a folder of a run from before holds existed
    assert run_state(settings) == ("to continue", 6)
    assert not (folder / "run.lock").exists()  # looking writes nothing
    with held(folder):
        assert run_state(settings) == ("running", 6)
    train(settings)
    assert run_state(settings) == ("finished", 0)


def test_a_checkpoint_of_other_networks_is_refused_with_its_path(data_file, tmp_path, monkeypatch):
    from lmencoders.errors import ModelMismatchError
    from lmencoders.resume import load_checkpoint

    kill_at(monkeypatch, 1, checkpoint_written=True)
    with pytest.raises(Killed):
        train(config(data_file, tmp_path))
    monkeypatch.undo()
    folder = tmp_path / run_name(config(data_file, tmp_path))
    checkpoint = load_checkpoint(folder)
    del checkpoint.modules["policy"]
    torch.save(
        {
            "modules": checkpoint.modules,
            "rng": checkpoint.rng,
            "run": json.dumps(
                {
                    "epoch": 1,
                    "grad_step": 3,
                    "train_seconds": 1.0,
                    "evaluator": checkpoint.evaluator,
                }
            ),
        },
        folder / CHECKPOINT,
    )
    with pytest.raises(ModelMismatchError, match=rf"{CHECKPOINT}: no state for \['policy'\]"):
        train(config(data_file, tmp_path))


def test_a_run_with_tensorboard_logs_continues(data_file, tmp_path, monkeypatch):
    """`lmencoders train` writes tensorboard logs by default; they go on with the run."""
    kill_at(monkeypatch, 1, checkpoint_written=True)
    with pytest.raises(Killed):
        train(config(data_file, tmp_path, tensorboard=True))
    monkeypatch.undo()
    events = tmp_path / "tensorboard" / "runs" / run_name(config(data_file, tmp_path))
    before = set(events.glob("events.*"))
    time.sleep(1.1)  # an events file is named by the second it was opened in
    result = train(config(data_file, tmp_path, tensorboard=True))
    assert result["run"] == events.name
    assert before and set(events.glob("events.*")) > before  # the earlier attempt's stay
