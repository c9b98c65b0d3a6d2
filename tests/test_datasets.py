"""NeoRL files in NeoRL's exact layout, made here (the download server is unreachable)."""

from __future__ import annotations

import hashlib

import d3rlpy
import numpy as np
import pytest
from conftest import neorl_arrays

import lmencoders
from lmencoders.datasets import (
    DatasetFileError,
    load_neorl,
    neorl_file_name,
    read_neorl_file,
    to_mdp_dataset,
)
from lmencoders.envs import make_env


def test_file_names_follow_neorl():
    assert neorl_file_name("Hopper-v3", "low", 99) == "Hopper-v3-low-100-train-noise.npz"
    assert neorl_file_name("Hopper-v3", "low", 10, "val") == "Hopper-v3-low-10-val-noise.npz"
    assert neorl_file_name("ib", "high", 100) == "ib-high-100-train.npz"
    assert neorl_file_name("Hopper-v5", "low", 30) == "Hopper-v5-low-30-train.npz"


def test_read_restores_the_leading_zero_and_train_num_keeps_first_trajectories(tmp_path):
    arrays = neorl_arrays(6)
    path = tmp_path / neorl_file_name("Hopper-v5", "low", 6)
    np.savez(path, **arrays)
    data = read_neorl_file(path)
    assert data.index[0] == 0 and data.num_trajectories == 6
    first = load_neorl("Hopper-v5", "low", train_num=6, data_dir=tmp_path).first(4)
    assert first.num_trajectories == 4
    assert len(first.obs) == int(arrays["index"][3])
    assert np.array_equal(first.obs, arrays["obs"][: int(arrays["index"][3])])


def test_conversion_keeps_every_transition_and_marks_ends(tmp_path):
    arrays = neorl_arrays(5, steps=40)
    np.savez(tmp_path / "d.npz", **arrays)
    data = read_neorl_file(tmp_path / "d.npz")
    dataset = to_mdp_dataset(data)
    assert len(dataset.episodes) == 5
    assert dataset.transition_count == len(arrays["obs"])
    for episode, (start, end) in zip(dataset.episodes, data.trajectory_bounds()):
        done = bool(arrays["done"][end - 1])
        assert bool(episode.terminated) == done
        assert np.array_equal(episode.observations[: end - start], arrays["obs"][start:end])
        if not done:  # the last next_obs is kept so the last transition is not lost
            assert np.array_equal(episode.observations[-1], arrays["next_obs"][end - 1])
    assert dataset.dataset_info.action_space == d3rlpy.ActionSpace.CONTINUOUS


def test_neorl_named_files_are_checked_against_neorl_md5(tmp_path):
    name = "Hopper-v3-low-100-train-noise.npz"
    np.savez(tmp_path / name, **neorl_arrays(2))
    actual = hashlib.md5((tmp_path / name).read_bytes()).hexdigest()
    with pytest.raises(DatasetFileError, match=rf"{name}: md5 {actual} does not match NeoRL's"):
        read_neorl_file(tmp_path / name)
    assert read_neorl_file(tmp_path / name, verify=False).num_trajectories == 2


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate", "unreadable"),
        ("drop_index", r"missing \['index'\]"),
        ("short_reward", "reward"),
    ],
)
def test_broken_files_are_named_in_clear_errors(tmp_path, damage, message):
    arrays = neorl_arrays(2)
    path = tmp_path / "broken.npz"
    if damage == "drop_index":
        del arrays["index"]
    if damage == "short_reward":
        arrays["reward"] = arrays["reward"][:-1]
    np.savez(path, **arrays)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DatasetFileError, match=rf"broken\.npz.*{message}"):
        read_neorl_file(path)


def test_missing_data_dir_without_polixir_neorl_is_explained():
    with pytest.raises(DatasetFileError, match="data_dir"):
        load_neorl("Hopper-v3")


def test_neorl_file_to_training_to_evaluation(tmp_path, tiny_lm):
    """A NeoRL-layout file through the loader, d3rlpy, TD3+BC with the LM encoder, evaluation."""
    np.savez(tmp_path / neorl_file_name("Hopper-v5", "low", 4), **neorl_arrays(4))
    dataset = to_mdp_dataset(load_neorl("Hopper-v5", "low", train_num=4, data_dir=tmp_path))
    scaler = d3rlpy.preprocessing.StandardObservationScaler()
    factory = lmencoders.LMEncoderFactory(
        description="hopper", model=tiny_lm, hidden_units=[32], observation_scaler=scaler
    )
    factory.precompute(dataset, cache_dir=False, show_progress=False)
    algo = d3rlpy.algos.TD3PlusBCConfig(
        actor_encoder_factory=factory,
        critic_encoder_factory=factory,
        observation_scaler=scaler,
        batch_size=16,
    ).create(device="cpu")
    algo.fit(
        dataset,
        n_steps=5,
        n_steps_per_epoch=5,
        show_progress=False,
        logger_adapter=d3rlpy.logging.NoopAdapterFactory(),
    )
    env = make_env("Hopper-v5", max_episode_steps=20)
    score = d3rlpy.metrics.evaluate_qlearning_with_environment(algo, env, n_trials=1)
    assert np.isfinite(score)
