from __future__ import annotations

import numpy as np
import pytest

import lmencoders
from lmencoders import table as table_module
from lmencoders.table import FeatureTable


def test_table_finds_exactly_what_was_inserted():
    rng = np.random.default_rng(0)
    keys = rng.integers(-(10**6), 10**6, size=(500, 12))
    values = rng.standard_normal((500, 4)).astype(np.float32)
    table = FeatureTable(12, 4)
    table.insert(keys[:300], values[:300])
    found, pos = table.lookup(keys)
    assert found[:300].all() and not found[300:].any()
    assert np.array_equal(table.gather(pos[:300]), values[:300])


def test_table_never_confuses_rows_whose_hashes_collide(monkeypatch):
    monkeypatch.setattr(table_module, "row_hashes", lambda codes: np.zeros(len(codes), np.uint64))
    table = FeatureTable(3, 1)
    table.insert(np.array([[1, 2, 3]]), np.array([[7.0]], np.float32))
    found, pos = table.lookup(np.array([[1, 2, 3], [3, 2, 1]]))
    assert found.tolist() == [True, False]
    assert table.gather(pos[:1]).tolist() == [[7.0]]


def test_index_stays_sorted_across_interleaved_inserts():
    from lmencoders.table import RowIndex

    rng = np.random.default_rng(3)
    rows = rng.integers(-1000, 1000, size=(600, 5))
    index = RowIndex(5)
    for part in np.array_split(np.arange(600), 7):
        index.insert(rows[part], part)
    found, values = index.lookup(rows)
    unique_rows = len(np.unique(rows, axis=0))
    assert found.all() and len(index) == unique_rows
    assert (rows[values] == rows).all()


def test_scaled_batches_find_rows_that_cannot_be_unscaled_exactly(tiny_lm):
    """FinRL-sized numbers do not survive float32 scaling; exact scaled bits still match."""
    import d3rlpy
    import torch

    from lmencoders.features import frozen_features

    rng = np.random.default_rng(0)
    obs = rng.uniform(0, 2e6, size=(50, 3)).astype(np.float32)
    scaler = d3rlpy.preprocessing.StandardObservationScaler(mean=obs.mean(0), std=obs.std(0))
    description = lmencoders.load_description(
        {"name": "cash", "dimensions": [{"label": "balance"}, {"label": "debt"}, {"label": "a"}]}
    )
    expected = lmencoders.embed_observations(obs, description, model=tiny_lm, show_progress=False)
    scaled = scaler.transform(torch.from_numpy(obs))
    unscaled = scaler.reverse_transform(scaled).numpy()
    assert (description.quantize(unscaled) != description.quantize(obs)).any()  # lossy
    cache = frozen_features(tiny_lm, description)
    got = cache.of_tensor(scaled, scaler, scaler.reverse_transform)
    assert np.array_equal(got.numpy(), expected)


def test_table_respects_its_row_limit():
    table = FeatureTable(2, 1, max_rows=3)
    table.insert(np.arange(10).reshape(5, 2), np.zeros((5, 1), np.float32))
    assert len(table) == 3


def test_embed_observations_runs_the_lm_once_per_distinct_observation(tiny_lm, lm_texts):
    obs = np.random.default_rng(1).standard_normal((40, 12))
    batch = np.concatenate([obs, obs[:10]])
    first = lmencoders.embed_observations(batch, "hopper", model=tiny_lm, show_progress=False)
    assert lm_texts == [40]
    again = lmencoders.embed_observations(obs[::-1], "hopper", model=tiny_lm, show_progress=False)
    assert lm_texts == [40]
    assert np.array_equal(again, first[:40][::-1])
    assert np.array_equal(first[40:], first[:10])


def test_cached_features_equal_freshly_computed_ones(tiny_lm):
    from lmencoders.backbone import language_model

    obs = np.random.default_rng(2).standard_normal((16, 11))
    cached = lmencoders.embed_observations(obs, "hopper-v5", model=tiny_lm, show_progress=False)
    description = lmencoders.load_description("hopper-v5")
    fresh = language_model(tiny_lm).encode(description.format_segments(obs), ", ")
    assert np.allclose(cached, fresh.numpy(), atol=1e-6)


def test_a_new_scaler_never_reuses_the_index_of_a_deleted_one(tiny_lm):
    import gc

    import d3rlpy
    import torch

    from lmencoders.features import frozen_features

    obs = np.random.default_rng(5).standard_normal((20, 12)).astype(np.float32)
    description = lmencoders.load_description("hopper")
    expected = lmencoders.embed_observations(obs, description, model=tiny_lm, show_progress=False)
    cache = frozen_features(tiny_lm, description)
    for shift in (0.0, 3.0, -2.0):  # ids of deleted scalers are often handed out again
        scaler = d3rlpy.preprocessing.StandardObservationScaler(
            mean=obs.mean(0) + shift, std=obs.std(0)
        )
        got = cache.of_tensor(
            scaler.transform(torch.from_numpy(obs)), scaler, scaler.reverse_transform
        )
        assert np.allclose(got.numpy(), expected, atol=1e-6)
        del scaler
        gc.collect()


def test_bfloat16_autocast_is_opt_in_close_and_cached_apart(tiny_lm, tmp_path, hopper_dataset):
    from lmencoders.features import precompute_features

    obs = hopper_dataset.episodes[0].observations[:16]
    full = lmencoders.embed_observations(obs, "hopper", model=tiny_lm, show_progress=False)
    half = lmencoders.embed_observations(
        obs, "hopper", model=tiny_lm, precision="bfloat16", show_progress=False
    )
    assert half.dtype == np.float32 and np.isfinite(half).all()
    assert not np.array_equal(full, half)  # really ran in bfloat16
    assert np.abs(full - half).max() < 5e-2
    a = precompute_features(obs, "hopper", model=tiny_lm, cache_dir=tmp_path, show_progress=False)
    b = precompute_features(
        obs, "hopper", model=tiny_lm, cache_dir=tmp_path, show_progress=False, precision="bfloat16"
    )
    assert a.path != b.path and "bfloat16" in b.path.name
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        lmencoders.LMEncoderFactory(description="hopper", model=tiny_lm, precision="fp8")


def test_tuned_lm_trains_under_bfloat16_autocast(tiny_lm, hopper_dataset):
    import d3rlpy

    factory = lmencoders.LMEncoderFactory(
        description="hopper",
        model=tiny_lm,
        tuning="ln_embed",
        precision="bfloat16",
        hidden_units=[16],
    )
    algo = d3rlpy.algos.TD3PlusBCConfig(
        actor_encoder_factory=factory,
        critic_encoder_factory=factory,
        batch_size=8,
        observation_scaler=d3rlpy.preprocessing.StandardObservationScaler(),
    ).create()
    algo.fit(
        hopper_dataset,
        n_steps=2,
        n_steps_per_epoch=2,
        show_progress=False,
        logger_adapter=d3rlpy.logging.NoopAdapterFactory(),
    )
    assert np.isfinite(algo.predict(hopper_dataset.episodes[0].observations[:3])).all()


def test_the_default_lm_runs_scaled_dot_product_attention():
    from lmencoders.backbone import language_model

    assert language_model().model.config._attn_implementation == "sdpa"
