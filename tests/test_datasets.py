"""NeoRL files in NeoRL's exact layout, made here (the download server is unreachable)."""

from __future__ import annotations

import hashlib

import d3rlpy
import gymnasium as gym
import numpy as np
import pytest
from conftest import neorl_arrays

import lmencoders
from lmencoders.collect import dataset_file_name
from lmencoders.datasets import (
    DatasetFileError,
    load_neorl,
    neorl_file_name,
    parse_neorl_file_name,
    read_neorl_file,
    to_mdp_dataset,
)
from lmencoders.envs import make_env


def test_file_names_follow_neorl():
    assert neorl_file_name("Hopper-v3", "low", 99) == "Hopper-v3-low-100-train-noise.npz"
    assert neorl_file_name("Hopper-v3", "low", 10, "val") == "Hopper-v3-low-10-val-noise.npz"
    assert neorl_file_name("ib", "high", 100) == "ib-high-100-train.npz"
    assert neorl_file_name("Hopper-v5", "low", 30) == "Hopper-v5-low-30-train.npz"
    # a second draw of the collector keeps NeoRL's fields and names its seed
    second = dataset_file_name("finance", "high", 99, "train", seed=1)
    assert second == "finance-high-99-train-seed1.npz"
    assert parse_neorl_file_name(second) == {
        "task": "finance", "level": "high", "size": 99, "split": "train"
    }  # fmt: skip
    assert dataset_file_name("finance", "high", 99, "train") == "finance-high-99-train.npz"


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


@pytest.mark.parametrize("field, row", [("action", 7), ("reward", 12), ("obs", 3)])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_data_is_refused_with_row_and_field(tmp_path, field, row, value):
    arrays = neorl_arrays(2, steps=10)
    arrays[field][row, 0] = value
    path = tmp_path / "Hopper-v5-low-2-train.npz"
    np.savez(path, **arrays)
    with pytest.raises(DatasetFileError, match=rf"field '{field}' row {row}, column 0 is"):
        read_neorl_file(path)
    from lmencoders.cli import main

    assert main(["train", "--dataset", str(path), "--out", str(tmp_path / "runs")]) == 2
    assert not (tmp_path / "runs").exists()


def test_d3rlpy_h5_files_train_precompute_and_keep_the_first_trajectories(tmp_path, tiny_lm):
    from lmencoders.datasets import load_dataset
    from lmencoders.train import TrainConfig, train

    buffer = to_mdp_dataset(read_neorl_file(_neorl_file(tmp_path, 5)))
    path = tmp_path / "hopper.h5"
    with open(path, "w+b") as f:
        buffer.dump(f)
    dataset = load_dataset(path)
    assert dataset.trajectories == 5 and dataset.env is None
    assert load_dataset(path, train_num=2).trajectories == 2
    assert np.array_equal(
        dataset.observations(), load_dataset(_neorl_file(tmp_path, 5)).observations()
    )
    from lmencoders.cli import main

    assert (
        main(
            [
                "precompute",
                str(path),
                "--description",
                "hopper",
                "--model",
                tiny_lm,
                "--cache-dir",
                str(tmp_path / "cache"),
            ]
        )
        == 0
    )
    result = train(
        TrainConfig(
            dataset=str(path),
            env="Hopper-v5",
            encoder="vector",
            steps=4,
            eval_episodes=1,
            batch_size=8,
            out_dir=str(tmp_path / "runs"),
            tensorboard=False,
        )
    )
    assert result["dataset_trajectories"] == 5 and result["run"].startswith("hopper-td3+bc")
    bad = buffer.episodes[1].rewards
    bad[3] = np.nan
    with open(path, "w+b") as f:
        buffer.dump(f)
    with pytest.raises(DatasetFileError, match=r"hopper\.h5: field 'rewards' row \d+"):
        load_dataset(path)


def _neorl_file(folder, trajectories):
    path = folder / f"Hopper-v5-low-{trajectories}-train.npz"
    if not path.exists():
        np.savez(path, **neorl_arrays(trajectories, steps=12))
    return path


def _minari_dataset(folder, dataset_id: str, episodes: int = 3, steps: int = 15):
    """A real local Minari dataset of Hopper-v5 (gymnasium's 11-dim layout) rollouts."""
    import minari
    from minari.data_collector import EpisodeBuffer

    env = gym.make("Hopper-v5", max_episode_steps=steps)
    rng = np.random.default_rng(0)
    buffers = []
    for episode in range(episodes):
        obs, _ = env.reset(seed=episode)
        columns = {
            "observations": [obs],
            "actions": [],
            "rewards": [],
            "terminations": [],
            "truncations": [],
        }
        while True:
            action = rng.uniform(-1, 1, 3).astype(np.float32)
            obs, reward, terminated, truncated, _ = env.step(action)
            for key, value in zip(list(columns)[1:], (action, reward, terminated, truncated)):
                columns[key].append(value)
            columns["observations"].append(obs)
            if terminated or truncated:
                break
        buffers.append(EpisodeBuffer(**{k: np.asarray(v) for k, v in columns.items()}))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # minari asks for author and code links
        minari.create_dataset_from_buffers(dataset_id, buffers, env=env, algorithm_name="random")
    return buffers


def test_local_minari_datasets_load_train_and_evaluate(tmp_path, monkeypatch, tiny_lm):
    pytest.importorskip("minari")
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    from lmencoders.datasets import load_dataset
    from lmencoders.train import TrainConfig, train

    buffers = _minari_dataset(tmp_path, "test/hopper-random-v0")
    dataset = load_dataset("minari:test/hopper-random-v0")
    assert dataset.trajectories == 3 and dataset.env == "minari:test/hopper-random-v0"
    steps = sum(len(b.actions) for b in buffers)
    kept = sum(0 if b.terminations[-1] else 1 for b in buffers)  # time-outs keep their last obs
    assert dataset.buffer.transition_count + len(buffers) - kept >= steps
    assert len(dataset.observations()) >= steps
    result = train(
        TrainConfig(
            dataset="minari:test/hopper-random-v0",
            model=tiny_lm,
            steps=4,
            eval_episodes=1,
            batch_size=8,
            out_dir=str(tmp_path / "runs"),
            tensorboard=False,
        )
    )
    assert result["config"]["description"] == "hopper-v5"  # 11 dims: gymnasium's layout
    assert result["evaluation"]["env"] == "minari:test/hopper-random-v0"
    with pytest.raises(DatasetFileError, match="no such local Minari dataset"):
        load_dataset("minari:test/absent-v0")


def test_finrl_is_a_registered_gymnasium_environment():
    env = gym.make("lmencoders/FinRL-v0")
    obs, _ = env.reset(seed=0)
    assert obs.shape == (181,)
