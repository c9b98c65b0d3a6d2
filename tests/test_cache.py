from __future__ import annotations

import warnings

import numpy as np
import pytest

import lmencoders
from lmencoders.features import clear_feature_caches, precompute_features


def observations(n=30, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 12))


def test_second_process_reads_features_from_disk(tiny_lm, tmp_path, lm_texts):
    obs = np.concatenate([observations(), observations()[:5]])
    first = precompute_features(
        obs, "hopper", model=tiny_lm, cache_dir=tmp_path, show_progress=False
    )
    assert (first.source, first.unique, first.observations) == ("computed", 30, 35)
    assert first.path.is_file() and lm_texts == [30]
    expected = lmencoders.embed_observations(obs, "hopper", model=tiny_lm, show_progress=False)
    clear_feature_caches()  # as a new process would start
    second = precompute_features(
        obs[::-1], "hopper", model=tiny_lm, cache_dir=tmp_path, show_progress=False
    )
    assert second.source == "disk" and second.path == first.path and lm_texts == [30]
    again = lmencoders.embed_observations(obs, "hopper", model=tiny_lm, show_progress=False)
    assert np.array_equal(again, expected) and lm_texts == [30]


def test_other_data_description_or_pooling_use_other_files(tiny_lm, tmp_path):
    a = precompute_features(
        observations(), "hopper", model=tiny_lm, cache_dir=tmp_path, show_progress=False
    )
    b = precompute_features(
        observations(seed=1), "hopper", model=tiny_lm, cache_dir=tmp_path, show_progress=False
    )
    c = precompute_features(
        observations(),
        "hopper",
        model=tiny_lm,
        pooling="cls",
        cache_dir=tmp_path,
        show_progress=False,
    )
    assert len({a.path, b.path, c.path}) == 3


def test_corrupt_cache_is_rebuilt_never_used(tiny_lm, tmp_path, lm_texts):
    report = precompute_features(
        observations(), "hopper", model=tiny_lm, cache_dir=tmp_path, show_progress=False
    )
    data = dict(np.load(report.path))
    data["features"] = data["features"] + 1.0  # silently wrong numbers
    np.savez(report.path, **data)
    clear_feature_caches()
    with pytest.warns(UserWarning, match="corrupt"):
        again = precompute_features(
            observations(), "hopper", model=tiny_lm, cache_dir=tmp_path, show_progress=False
        )
    assert again.source == "computed" and lm_texts == [30, 30]
    restored = dict(np.load(report.path))
    assert np.allclose(restored["features"], data["features"] - 1.0, atol=1e-6)


def test_truncated_and_stale_files_are_rebuilt(tiny_lm, tmp_path):
    report = precompute_features(
        observations(), "hopper", model=tiny_lm, cache_dir=tmp_path, show_progress=False
    )
    report.path.write_bytes(report.path.read_bytes()[:100])
    clear_feature_caches()
    with pytest.warns(UserWarning, match="unreadable"):
        precompute_features(
            observations(), "hopper", model=tiny_lm, cache_dir=tmp_path, show_progress=False
        )
    data = dict(np.load(report.path))
    data["meta"] = np.array(str(data["meta"]).replace('"mean"', '"cls"'))
    np.savez(report.path, **data)
    clear_feature_caches()
    with pytest.warns(UserWarning, match="stale.*pooling"):
        rebuilt = precompute_features(
            observations(), "hopper", model=tiny_lm, cache_dir=tmp_path, show_progress=False
        )
    assert rebuilt.source == "computed"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clear_feature_caches()
        ok = precompute_features(
            observations(), "hopper", model=tiny_lm, cache_dir=tmp_path, show_progress=False
        )
    assert ok.source == "disk"


def test_no_temporary_files_are_left_behind(tiny_lm, tmp_path):
    precompute_features(
        observations(), "hopper", model=tiny_lm, cache_dir=tmp_path, show_progress=False
    )
    assert [p.suffix for p in tmp_path.iterdir()] == [".npz"]
