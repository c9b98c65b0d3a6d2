"""standardize_features: each frozen LM feature standardised by its mean and std over the
dataset's distinct observations (tiny BERT from a config, real MuJoCo observations)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_encoders import ALGORITHMS, build, factory_for, fit

import lmencoders
from lmencoders import embed_observations
from lmencoders.datasets import replay_buffer_observations
from lmencoders.encoders import TextFeatures
from lmencoders.errors import ConfigError
from lmencoders.features import STD_EPSILON, feature_statistics, frozen_features
from lmencoders.train import TrainConfig


def standardized(tiny_lm: str, **kwargs) -> lmencoders.LMEncoderFactory:
    return factory_for(tiny_lm, standardize_features=True, **kwargs)


def observations(dataset) -> np.ndarray:
    return np.concatenate([ep.observations for ep in dataset.episodes])


def text_features(algo) -> list[TextFeatures]:
    """Every LM feature module of the algorithm's networks (targets included)."""
    networks = [v for v in vars(algo.impl.modules).values() if isinstance(v, torch.nn.Module)]
    return [m for net in networks for m in net.modules() if isinstance(m, TextFeatures)]


def test_features_are_standardised_with_the_mean_and_std_of_the_distinct_observations(
    tiny_lm, hopper_dataset
):
    factory = standardized(tiny_lm)
    factory.precompute(hopper_dataset, cache_dir=False)
    algo = build(ALGORITHMS["td3+bc"], factory)
    fit(algo, hopper_dataset, steps=2)
    met = replay_buffer_observations(hopper_dataset)  # every observation training meets
    codes = lmencoders.load_description("hopper").quantize(met)
    _, first = np.unique(codes, axis=0, return_index=True)
    distinct = embed_observations(met[first], "hopper", model=tiny_lm).astype(np.float64)
    mean, std = distinct.mean(axis=0), distinct.std(axis=0) + STD_EPSILON
    obs = observations(hopper_dataset)
    raw = embed_observations(obs, "hopper", model=tiny_lm)
    features = algo.impl.modules.policy._encoder.features
    with torch.no_grad():
        got = features.lm_features(algo.observation_scaler.transform(torch.from_numpy(obs)))
    assert np.allclose(got.numpy(), (raw - mean) / std, atol=1e-4)
    with torch.no_grad():
        over_data = features.lm_features(algo.observation_scaler.transform(torch.from_numpy(met)))
    assert np.abs(over_data.numpy()[first].mean(axis=0)).max() < 1e-4  # columns centred


def test_precompute_after_the_encoders_exist_gives_them_the_statistics(tiny_lm, hopper_dataset):
    """d3rlpy builds encoders at fit or build_with_dataset; a precompute after that reaches
    every encoder the factory built: actor, critics and their targets."""
    factory = standardized(tiny_lm)
    algo = build(ALGORITHMS["td3+bc"], factory)
    algo.build_with_dataset(hopper_dataset)
    factory.precompute(hopper_dataset, cache_dir=False)
    encoders = text_features(algo)
    assert len(encoders) == 6  # policy, target policy, two critics, two target critics
    for each in encoders:
        assert torch.equal(each.feature_mean, torch.from_numpy(factory._statistics.mean))
        assert torch.equal(each.feature_std, torch.from_numpy(factory._statistics.std))
    fit(algo, hopper_dataset, steps=2)


def test_training_without_the_statistics_is_a_clear_error(tiny_lm, hopper_dataset):
    algo = build(ALGORITHMS["td3+bc"], standardized(tiny_lm))
    with pytest.raises(ConfigError, match=r"call factory.precompute\(dataset\) before training"):
        fit(algo, hopper_dataset, steps=1)


@pytest.mark.parametrize("pooling", ["mean", "segments"])
def test_a_saved_model_keeps_the_statistics(pooling, tiny_lm, hopper_dataset, tmp_path):
    """Per-piece tables are standardised per column too (each piece's own statistics)."""
    factory = standardized(tiny_lm, pooling=pooling)
    factory.precompute(hopper_dataset, cache_dir=False)
    algo = build(ALGORITHMS["td3+bc"], factory)
    fit(algo, hopper_dataset, steps=3)
    lmencoders.save_model(algo, tmp_path / "model")
    loaded = lmencoders.load_model(tmp_path / "model")
    assert all(each._statistics_set for each in text_features(loaded))
    obs = np.concatenate([hopper_dataset.episodes[0].observations[:8], np.full((2, 12), 0.3)])
    assert np.array_equal(algo.predict(obs), loaded.predict(obs))


def test_standardize_features_needs_a_frozen_lm(tiny_lm, data_file):
    with pytest.raises(ConfigError, match="needs tuning='frozen'"):
        standardized(tiny_lm, tuning="ln_embed")
    with pytest.raises(ConfigError, match="applies to a frozen LM's features"):
        TrainConfig(dataset=str(data_file), encoder="vector", standardize_features=True)


def test_statistics_of_no_observations_is_a_clear_error(tiny_lm):
    table = frozen_features(tiny_lm, lmencoders.load_description("hopper"))
    with pytest.raises(
        ConfigError, match=r"a \(N, 12\) array of observations, got shape \(0, 12\)"
    ):
        feature_statistics(table, np.empty((0, 12), dtype=np.float32))
