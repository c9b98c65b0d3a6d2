from __future__ import annotations

import threading
import time
import warnings

import numpy as np
import pytest

import lmencoders
from lmencoders.features import clear_feature_caches, precompute_features
from lmencoders.files import hold_file


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


def _rewrite(path, **changes):
    """Write a cache file with some arrays changed and a checksum that matches them."""
    from lmencoders.cache import _checksum

    data = dict(np.load(path)) | changes
    data["checksum"] = np.array(_checksum(data["codes"], data["features"], data["raw"]))
    np.savez(path, **data)


@pytest.mark.parametrize(
    "breakage, problem",
    [
        ("empty", "unreadable"),
        ("garbage", "unreadable"),
        ("wider features", "shapes that disagree"),
        ("fewer rows", "other rows"),
        ("nan feature", "non-finite"),
    ],
)
def test_every_broken_cache_file_is_rebuilt(tiny_lm, tmp_path, breakage, problem, lm_texts):
    report = precompute_features(
        observations(), "hopper", model=tiny_lm, cache_dir=tmp_path, show_progress=False
    )
    expected = np.load(report.path)["features"]
    if breakage == "empty":
        report.path.write_bytes(b"")
    elif breakage == "garbage":
        report.path.write_bytes(b"\x00not an npz file" * 10)
    else:
        data = dict(np.load(report.path))
        if breakage == "wider features":
            _rewrite(report.path, features=np.zeros((30, 7), np.float32))
        elif breakage == "fewer rows":
            _rewrite(
                report.path,
                codes=data["codes"][:5],
                features=data["features"][:5],
                raw=data["raw"][:5],
            )
        else:
            features = data["features"].copy()
            features[3, 0] = np.nan
            _rewrite(report.path, features=features)
    for attempt in range(2):  # the rebuilt file is then used as it is
        clear_feature_caches()
        if attempt == 0:
            with pytest.warns(UserWarning, match=problem):
                again = precompute_features(
                    observations(), "hopper", model=tiny_lm, cache_dir=tmp_path, show_progress=False
                )
            assert again.source == "computed"
        else:
            again = precompute_features(
                observations(), "hopper", model=tiny_lm, cache_dir=tmp_path, show_progress=False
            )
            assert again.source == "disk"
    assert np.allclose(np.load(report.path)["features"], expected, atol=1e-6)
    assert lm_texts == [30, 30]


def test_orphaned_temporary_files_are_removed_and_live_ones_kept(tiny_lm, tmp_path):
    import os
    import subprocess

    from lmencoders.files import _HOST

    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = tmp_path / f"features-x.npz.{_HOST}~{dead.pid}.abc123.tmp"
    live = tmp_path / f"features-y.npz.{_HOST}~{os.getpid()}.def456.tmp"
    old_style = tmp_path / "features-z.npz.q1w2e3.tmp"
    for path in (orphan, live, old_style):
        path.write_bytes(b"partial")
    os.utime(old_style, (1, 1))  # decades old, writer unknown
    precompute_features(
        observations(), "hopper", model=tiny_lm, cache_dir=tmp_path, show_progress=False
    )
    assert not orphan.exists() and not old_style.exists() and live.exists()


def test_non_finite_features_are_an_error_and_never_cached(tiny_lm, tmp_path, monkeypatch):
    from lmencoders.backbone import LanguageModel
    from lmencoders.errors import FeatureError

    original = LanguageModel.encode

    def overflowing(self, *args, **kwargs):  # as a half-precision LM that overflows would
        out = original(self, *args, **kwargs)
        out[2] = float("inf")
        return out

    monkeypatch.setattr(LanguageModel, "encode", overflowing)
    clear_feature_caches()
    with pytest.raises(FeatureError, match="NaN/inf features for 1 of 30"):
        precompute_features(
            observations(), "hopper", model=tiny_lm, cache_dir=tmp_path, show_progress=False
        )
    with pytest.raises(FeatureError):
        lmencoders.embed_observations(observations(), "hopper", model=tiny_lm, show_progress=False)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name, value", [("batch_size", -1), ("batch_size", 0), ("max_length", -5)])
def test_bad_sizes_are_refused_before_anything_is_computed(tiny_lm, tmp_path, name, value):
    from lmencoders.errors import ConfigError

    clear_feature_caches()
    with pytest.raises(ConfigError, match=rf"{name} must be a positive integer, got {value}"):
        precompute_features(
            observations(), "hopper", model=tiny_lm, cache_dir=tmp_path, **{name: value}
        )
    with pytest.raises(ConfigError, match=name):
        lmencoders.embed_observations(observations(), "hopper", model=tiny_lm, **{name: value})
    with pytest.raises(ConfigError, match=name):
        lmencoders.LMEncoderFactory(description="hopper", model=tiny_lm, **{name: value})
    assert not list(tmp_path.iterdir())


class Killed(Exception):
    """A process killed mid-precompute (raised where the LM would run)."""


def test_an_interrupted_precompute_goes_on_from_its_last_part(tiny_lm, tmp_path, monkeypatch):
    from lmencoders.backbone import LanguageModel

    obs = observations(n=30)
    whole = precompute_features(obs, "hopper", model=tiny_lm, show_progress=False)
    expected = lmencoders.embed_observations(obs, "hopper", model=tiny_lm, show_progress=False)
    assert whole.source == "computed"
    clear_feature_caches()
    passes: list[int] = []
    original = LanguageModel.encode_pieces

    def dying_on_third_part(self, segments, *args, **kwargs):  # as a killed process would
        passes.append(len(segments))
        if len(passes) == 3:
            raise Killed
        return original(self, segments, *args, **kwargs)

    monkeypatch.setattr(LanguageModel, "encode_pieces", dying_on_third_part)
    settings = dict(
        model=tiny_lm, pooling="segments", also_pooling="mean", part_rows=8, show_progress=False
    )
    with pytest.raises(Killed):
        precompute_features(obs, "hopper", cache_dir=tmp_path, **settings)
    parts = sorted(p.name for p in tmp_path.glob("*.part*.npz"))  # (and the parts' locks)
    assert len(parts) == 4 and all("-of-00004.npz" in p for p in parts)  # 2 parts x 2 poolings
    assert not [p for p in tmp_path.glob("*.npz") if ".part" not in p.name]  # no cache file yet

    clear_feature_caches()  # a new process
    passes.clear()
    report = precompute_features(obs, "hopper", cache_dir=tmp_path, **settings)
    assert passes == [8, 6]  # parts 3 and 4 only: 30 rows in parts of 8
    assert report.source == "computed" and report.path.is_file()
    assert not list(tmp_path.glob("*.part*"))  # merged into the cache files, then removed
    resumed = lmencoders.embed_observations(obs, "hopper", model=tiny_lm, show_progress=False)
    np.testing.assert_allclose(resumed, expected, atol=1e-5)  # parts batch other rows together
    pieces = lmencoders.embed_observations(
        obs, "hopper", model=tiny_lm, pooling="segments", show_progress=False
    )
    clear_feature_caches()
    monkeypatch.setattr(LanguageModel, "encode_pieces", original)
    straight = lmencoders.embed_observations(
        obs, "hopper", model=tiny_lm, pooling="segments", show_progress=False
    )
    np.testing.assert_allclose(pieces, straight, atol=1e-3)  # float16 storage


def test_a_broken_part_file_is_encoded_again(tiny_lm, tmp_path, monkeypatch, lm_texts):
    from lmencoders import features

    original = features._compute
    calls: list[int] = []

    def dying_on_third_part(tables, codes, *args, **kwargs):  # as a killed process would
        calls.append(len(codes))
        if len(calls) == 3:
            raise Killed
        return original(tables, codes, *args, **kwargs)

    obs = observations(n=20)
    settings = dict(model=tiny_lm, cache_dir=tmp_path, part_rows=8, show_progress=False)
    monkeypatch.setattr(features, "_compute", dying_on_third_part)
    with pytest.raises(Killed):
        precompute_features(obs, "hopper", **settings)
    monkeypatch.setattr(features, "_compute", original)
    parts = sorted(tmp_path.glob("*.part*.npz"))
    assert [p.name[-22:] for p in parts] == ["part00000-of-00003.npz", "part00001-of-00003.npz"]
    parts[1].write_bytes(parts[1].read_bytes()[:100])  # cut short
    clear_feature_caches()
    lm_texts.clear()
    with pytest.warns(UserWarning, match=r"part00001-of-00003.npz is unreadable"):
        report = precompute_features(obs, "hopper", **settings)
    assert lm_texts == [8, 4]  # the broken part and the missing one
    assert report.path.is_file() and not list(tmp_path.glob("*.part*"))


def test_a_part_that_another_process_holds_is_passed_over_then_waited_for(
    tiny_lm, tmp_path, lm_texts
):
    """Two lanes of a grid on one dataset share its precompute: a part whose lock another
    process holds is left to it; at the end this one waits for it, and encodes it itself
    when that process ended without saving it (killed)."""
    obs = observations(n=20)
    settings = dict(model=tiny_lm, part_rows=8, show_progress=False)
    name = precompute_features(obs, "hopper", cache_dir=tmp_path / "first", **settings).path.name
    expected = lmencoders.embed_observations(obs, "hopper", model=tiny_lm, show_progress=False)
    clear_feature_caches()
    lm_texts.clear()
    shared = tmp_path / "shared"
    shared.mkdir()
    worker = threading.Thread(
        target=precompute_features, args=(obs, "hopper"), kwargs=dict(cache_dir=shared, **settings)
    )
    with hold_file(shared / f"{name}.part00001-of-00003.npz.lock"):  # as another process would
        worker.start()
        deadline = time.monotonic() + 60
        while not (shared / f"{name}.part00002-of-00003.npz").exists():
            assert time.monotonic() < deadline, "the third part was never saved"
            time.sleep(0.05)
        assert worker.is_alive() and lm_texts == [8, 4]  # parts 1 and 3; part 2 waits
        assert not (shared / f"{name}.part00001-of-00003.npz").exists()
    worker.join(60)
    assert not worker.is_alive() and lm_texts == [8, 4, 8]  # then part 2, once free
    assert sorted(p.name for p in shared.iterdir()) == [name]  # no part or lock file left
    clear_feature_caches()
    lm_texts.clear()
    assert precompute_features(obs, "hopper", cache_dir=shared, **settings).source == "disk"
    loaded = lmencoders.embed_observations(obs, "hopper", model=tiny_lm, show_progress=False)
    assert lm_texts == []  # read from the shared cache file
    np.testing.assert_allclose(loaded, expected, atol=1e-5)
