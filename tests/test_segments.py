"""pooling="segments": one vector per piece of the description from one frozen LM pass, read by
a trained attention readout (tiny BERT from a config, real MuJoCo observations)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from test_encoders import ALGORITHMS, build, checkpoint_state, fit

import lmencoders
from lmencoders import LMEncoderFactory, load_description
from lmencoders.backbone import language_model


def factory_for(tiny_lm: str, **kwargs) -> LMEncoderFactory:
    import d3rlpy

    settings = dict(
        description="hopper",
        model=tiny_lm,
        pooling="segments",
        hidden_units=[32, 32],
        observation_scaler=d3rlpy.preprocessing.StandardObservationScaler(),
    )
    return LMEncoderFactory(**(settings | kwargs))


def plain_piece_means(path: str, segments: list[str], separator: str) -> torch.Tensor:
    """Plain Hugging Face: one forward over the text; each segment's token span found by
    tokenising the text before it (no offsets), its hidden states averaged."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    text = separator.join(segments)
    batch = tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state[0]
    means = []
    for k, segment in enumerate(segments):
        before = separator.join(segments[:k]) + (separator if k else "")
        start = 1 + len(tokenizer(before, add_special_tokens=False)["input_ids"])  # after [CLS]
        count = len(tokenizer(segment, add_special_tokens=False)["input_ids"])
        means.append(hidden[start : start + count].mean(0))
    return torch.stack(means)


def expected_pieces(path: str, pieces: list[str], separator: str) -> torch.Tensor:
    """Plain piece means of each chunk the text is cut into (one chunk if it fits)."""
    lm = language_model(path)
    ranges, first = [], 0  # by hand: as many consecutive pieces as fit, tokenised together
    for end in range(2, len(pieces) + 1):
        if len(lm.tokenizer(separator.join(pieces[first:end]))["input_ids"]) > lm.window:
            ranges.append((first, end - 1))
            first = end - 1
    ranges.append((first, len(pieces)))
    return torch.cat([plain_piece_means(path, pieces[a:b], separator) for a, b in ranges])


def test_piece_vectors_equal_a_plain_forward_over_the_pieces_tokens(tiny_lm, hopper_dataset):
    description = load_description(
        {
            "name": "short",
            "dimensions": [{"label": "thigh angle", "unit": "rad"}, {"label": "foot"}],
        }
    )
    obs = hopper_dataset.episodes[0].observations[:6, :2]
    segments = description.format_segments(obs)
    ours = language_model(tiny_lm).encode_pieces(segments, description.separator, batch_size=4)
    assert ours.shape == (6, 2, 32)
    for row, pieces in enumerate(segments):
        expected = plain_piece_means(tiny_lm, pieces, description.separator)
        assert torch.allclose(ours[row], expected, atol=1e-4)
    hopper = load_description("hopper")  # 12 pieces, cut into chunks by the tiny window
    segments = hopper.format_segments(hopper_dataset.episodes[0].observations[:4])
    ours = language_model(tiny_lm).encode_pieces(segments, hopper.separator)
    for row, pieces in enumerate(segments):
        assert torch.allclose(ours[row], expected_pieces(tiny_lm, pieces, ", "), atol=1e-4)


def test_chunked_long_texts_give_each_piece_its_chunks_states(tiny_lm):
    """FinRL-like groups in a window of 64 tokens: the text is cut between groups, and every
    piece is the mean of its tokens in the forward pass of its own chunk."""
    description = grouped_description()
    obs = np.random.default_rng(0).standard_normal((3, 12)) * 100
    segments = description.format_segments(obs)
    lm = language_model(tiny_lm)
    ours = lm.encode_pieces(segments, description.separator)
    for row, pieces in enumerate(segments):
        assert len(lm.tokenizer(description.separator.join(pieces))["input_ids"]) > lm.window
        expected = expected_pieces(tiny_lm, pieces, description.separator)
        assert torch.allclose(ours[row], expected, atol=1e-4)


def grouped_description():
    """FinRL-like: 12 dimensions in 4 groups, longer than the tiny LM's window of 64 tokens."""
    return load_description(
        {
            "name": "groups",
            "dimensions": [{"label": f"d{i}"} for i in range(12)],
            "groups": {
                "items": [{"label": f"g{g}", "dimensions": [g, g + 4, g + 8]} for g in range(4)]
            },
        }
    )


@pytest.mark.parametrize("kind", ["hopper", "groups"])
def test_one_pass_gives_the_pieces_and_the_mean_that_separate_passes_give(
    kind, tiny_lm, hopper_dataset
):
    """Both texts are cut into chunks by the tiny window: the mean merges them as encode does."""
    lm = language_model(tiny_lm)
    if kind == "hopper":
        description = load_description("hopper")
        obs = hopper_dataset.episodes[0].observations[:5]
    else:
        description = grouped_description()
        obs = np.random.default_rng(1).standard_normal((5, 12)) * 100
    segments = description.format_segments(obs)
    pieces, mean = lm.encode_pieces(segments, description.separator, with_mean=True)
    assert torch.equal(pieces, lm.encode_pieces(segments, description.separator))
    assert torch.allclose(mean, lm.encode(segments, description.separator), atol=1e-6)


def count_lm_forwards(monkeypatch) -> list[int]:
    """Spy on the LM body's forward: the number of texts of every batch it runs."""
    from lmencoders.backbone import LanguageModel

    batches: list[int] = []
    forward = LanguageModel._hidden

    def counting(self, input_ids, *args, **kwargs):
        batches.append(len(input_ids))
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(LanguageModel, "_hidden", counting)
    return batches


def test_precompute_fills_and_caches_both_poolings_from_one_lm_pass(
    tiny_lm, hopper_dataset, tmp_path, monkeypatch
):
    from lmencoders.features import clear_feature_caches, frozen_features, precompute_features

    clear_feature_caches()  # rows other tests put in the shared tables would be kept as they are
    obs = hopper_dataset.episodes[0].observations[:40]
    description = load_description("hopper")
    batches = count_lm_forwards(monkeypatch)
    settings = dict(model=tiny_lm, show_progress=False)

    def tables() -> list[np.ndarray]:
        return [frozen_features(tiny_lm, description, pooling=p)(obs) for p in ("mean", "segments")]

    report = precompute_features(
        obs, description, **settings, cache_dir=tmp_path, also_pooling="segments"
    )
    joint, together = list(batches), tables()
    assert report.source == "computed" and "-mean-" in report.path.name
    assert len(list(tmp_path.glob("features-*-segments-*.npz"))) == 1
    assert len(batches) == len(joint)  # both tables were full: reading them ran no LM
    apart = []
    for pooling in ("mean", "segments"):
        clear_feature_caches()
        batches.clear()
        precompute_features(obs, description, **settings, pooling=pooling)
        assert batches == joint  # one pass each: the same forwards as both together
        apart.append(frozen_features(tiny_lm, description, pooling=pooling)(obs))
    for one, other in zip(together, apart):
        assert np.allclose(one, other, atol=1e-6)
    clear_feature_caches()
    batches.clear()
    report = precompute_features(
        obs, description, **settings, cache_dir=tmp_path, also_pooling="segments"
    )
    assert report.source == "disk" and batches == []
    for one, other in zip(tables(), together):
        assert np.array_equal(one, other)


def test_precompute_makes_only_the_missing_pooling_again(tiny_lm, hopper_dataset, tmp_path):
    from lmencoders.features import clear_feature_caches, precompute_features

    clear_feature_caches()
    obs = hopper_dataset.episodes[0].observations[:20]
    settings = dict(model=tiny_lm, show_progress=False, cache_dir=tmp_path)
    precompute_features(obs, "hopper", **settings, pooling="segments", also_pooling="mean")
    (mean_file,) = tmp_path.glob("features-*-mean-*.npz")
    (pieces_file,) = tmp_path.glob("features-*-segments-*.npz")
    written = pieces_file.stat().st_mtime_ns
    mean_file.unlink()
    clear_feature_caches()
    report = precompute_features(obs, "hopper", **settings, pooling="segments", also_pooling="mean")
    assert report.source == "disk" and mean_file.is_file()
    assert pieces_file.stat().st_mtime_ns == written


def test_only_mean_and_segments_share_a_pass(tiny_lm):
    from lmencoders.errors import ConfigError
    from lmencoders.features import precompute_features

    with pytest.raises(ConfigError, match="also_pooling='mean' with pooling='cls'"):
        precompute_features(
            np.zeros((2, 12)), "hopper", model=tiny_lm, pooling="cls", also_pooling="mean"
        )
    from lmencoders.features import frozen_features

    description = load_description("hopper")
    pieces = frozen_features(tiny_lm, description, pooling="segments", max_length=32)
    mean = frozen_features(tiny_lm, description, pooling="mean", max_length=48)
    with pytest.raises(ConfigError, match="same LM, description, window and precision"):
        pieces.compute_with(mean, description.quantize(np.zeros((2, 12))), "cpu", None, False)


def test_embed_observations_gives_one_vector_per_piece(tiny_lm, hopper_dataset):
    obs = hopper_dataset.episodes[0].observations[:5]
    features = lmencoders.embed_observations(
        obs, "hopper", model=tiny_lm, pooling="segments", show_progress=False
    )
    assert features.shape == (5, 12, 32)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_trains_with_the_piece_readout(name, tiny_lm, hopper_dataset):
    algo = build(ALGORITHMS[name], factory_for(tiny_lm))
    fit(algo, hopper_dataset, steps=3)
    actions = algo.predict(hopper_dataset.episodes[0].observations[:4])
    assert actions.shape == (4, 3) and np.isfinite(actions).all()


def test_frozen_invariants_hold_and_the_readout_trains(tiny_lm, hopper_dataset, tmp_path):
    lm = language_model(tiny_lm)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    algo = build(ALGORITHMS["td3+bc"], factory_for(tiny_lm))
    algo.build_with_dataset(hopper_dataset)
    readout = algo.impl.modules.policy._encoder.features.readout
    initial = {k: v.detach().clone() for k, v in readout.state_dict().items()}
    fit(algo, hopper_dataset, steps=10)
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    assert any(not torch.equal(initial[k], v) for k, v in readout.state_dict().items())
    state = checkpoint_state(algo)
    assert not [k for k in state if "lm_parameters." in k]  # no LM tensor in the checkpoint
    assert [k for k in state if "readout.queries" in k]
    lmencoders.save_model(algo, tmp_path / "model")
    loaded = lmencoders.load_model(tmp_path / "model")
    obs = np.concatenate([hopper_dataset.episodes[0].observations[:8], np.full((2, 12), 0.3)])
    assert np.array_equal(algo.predict(obs), loaded.predict(obs))


def test_segments_pooling_needs_a_frozen_lm(tiny_lm):
    with pytest.raises(ValueError, match="needs tuning='frozen'"):
        factory_for(tiny_lm, tuning="ln_embed")


def test_decision_transformer_reads_through_the_frozen_table(tiny_lm, hopper_dataset):
    """DT flattens context windows into the encoder batch and pads with zero observations:
    the table serves them, and padding enters it only as the zero observation's own text."""
    import d3rlpy

    from lmencoders.features import frozen_features

    for pooling in ("mean", "segments"):
        factory = factory_for(tiny_lm, pooling=pooling, observation_scaler=None)
        factory.precompute(hopper_dataset, cache_dir=False, show_progress=False)
        table = frozen_features(tiny_lm, factory.load_description(), pooling=pooling)
        dt = d3rlpy.algos.DecisionTransformerConfig(
            encoder_factory=factory, context_size=5, batch_size=4
        ).create()
        dt.fit(
            hopper_dataset,
            n_steps=3,
            n_steps_per_epoch=3,
            show_progress=False,
            save_interval=10**6,
            logger_adapter=d3rlpy.logging.NoopAdapterFactory(),
        )
        zero = np.zeros((1, 12))
        found, position = table.table.lookup(factory.load_description().quantize(zero))
        expected = lmencoders.embed_observations(
            zero, "hopper", model=tiny_lm, pooling=pooling, show_progress=False
        ).reshape(1, -1)
        assert found[0] and np.allclose(table.table.gather(position)[0], expected[0], atol=1e-6)
        actor = dt.as_stateful_wrapper(target_return=100.0)
        action = actor.predict(hopper_dataset.episodes[0].observations[0], 0.0)
        assert np.isfinite(action).all()


@pytest.mark.parametrize(
    "pooling, method", [("segments", "readout attention"), ("mean", "gradient x input")]
)
def test_explain_draws_the_weight_of_every_piece(pooling, method, tiny_lm, tmp_path, capsys):
    from conftest import neorl_arrays

    from lmencoders.cli import main
    from lmencoders.explain import explain
    from lmencoders.train import TrainConfig, train

    data = tmp_path / "Hopper-v5-low-3-train.npz"
    np.savez(data, **neorl_arrays(3, steps=15))
    result = train(
        TrainConfig(
            dataset=str(data),
            model=tiny_lm,
            pooling=pooling,
            steps=4,
            batch_size=8,
            eval_episodes=1,
            out_dir=str(tmp_path / "runs"),
            tensorboard=False,
        )
    )
    run = tmp_path / "runs" / result["run"]
    explanation = explain(run, data, rows=8)
    assert explanation.method == method and explanation.labels[0] == "x position"
    for part in ("actor", "critic"):
        weights = explanation.weights[part]
        assert weights.shape == (12,) and np.all(weights >= 0)
        assert weights.sum() == pytest.approx(1.0, abs=1e-5)
    assert main(["explain", str(run), "--dataset", str(data), "--rows", "8"]) == 0
    printed = capsys.readouterr().out
    assert "| piece | actor | critic |" in printed and "thigh angle" in printed
    assert (run / "explain.png").stat().st_size > 5_000


def test_gradient_attribution_equals_a_direct_computation(tiny_lm):
    """|grad . embedding| per token of a plain Hugging Face forward (inputs_embeds), summed
    over each piece's tokens (spans from prefix tokenisation), normalised."""
    description = load_description(
        {"name": "two", "dimensions": [{"label": "angle", "unit": "rad"}, {"label": "velocity"}]}
    )
    segments = description.format_segments(np.array([[0.5, 1.5], [0.25, -2.0]]))
    weights = language_model(tiny_lm).piece_attribution(
        segments, description.separator, lambda features: features[:, 0] * features[:, 1]
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_lm)
    model = transformers.AutoModel.from_pretrained(tiny_lm).eval()
    for row, pieces in enumerate(segments):
        batch = tokenizer([description.separator.join(pieces)], return_tensors="pt")
        embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
        hidden = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
        pooled = hidden.last_hidden_state.mean(dim=1)
        (pooled[:, 0] * pooled[:, 1]).sum().backward()
        per_token = (embeds.grad * embeds).sum(-1).abs()[0].detach()
        expected = []
        for k, piece in enumerate(pieces):
            before = description.separator.join(pieces[:k]) + (description.separator if k else "")
            start = 1 + len(tokenizer(before, add_special_tokens=False)["input_ids"])
            count = len(tokenizer(piece, add_special_tokens=False)["input_ids"])
            expected.append(float(per_token[start : start + count].sum()))
        expected = np.array(expected) / sum(expected)
        assert np.allclose(weights[row], expected, atol=1e-5)


def test_a_table_past_the_memory_budget_lives_in_a_mapped_file(
    tiny_lm, hopper_dataset, monkeypatch, feature_cache_dir
):
    """Per-piece rows past $LMENCODERS_TABLE_BUDGET go to a memory-mapped file in the cache
    folder (unlinked at once: nothing is left behind), and read the same as rows in RAM."""
    from lmencoders.features import clear_feature_caches, frozen_features
    from lmencoders.table import table_budget

    obs = np.concatenate([e.observations for e in hopper_dataset.episodes])[:40]
    in_ram = lmencoders.embed_observations(
        obs, "hopper", model=tiny_lm, pooling="segments", show_progress=False
    )
    clear_feature_caches()
    monkeypatch.setenv("LMENCODERS_TABLE_BUDGET", "1K")
    assert table_budget() == 1024
    mapped = lmencoders.embed_observations(
        obs, "hopper", model=tiny_lm, pooling="segments", show_progress=False
    )
    table = frozen_features(tiny_lm, load_description("hopper"), pooling="segments").table
    assert table.mapped and len(table) == len(np.unique(obs, axis=0))
    # the same rows (float16 storage; the LM's batches may round the last bit differently)
    np.testing.assert_allclose(mapped, in_ram, atol=1e-3)
    assert list((feature_cache_dir / "tables").iterdir()) == []
    clear_feature_caches()


def test_mapped_rows_keep_exactly_what_was_stored_as_the_table_grows(tmp_path, monkeypatch):
    from lmencoders.table import FeatureTable

    monkeypatch.setenv("LMENCODERS_TABLE_BUDGET", "1K")
    rng = np.random.default_rng(0)
    table = FeatureTable(3, 8, dtype=np.float16, spill_dir=tmp_path)
    codes = rng.integers(-(10**6), 10**6, size=(3000, 3))
    features = rng.standard_normal((3000, 8)).astype(np.float32)
    for start in range(0, 3000, 700):  # grows past its first capacity of 1024 rows twice
        table.insert(codes[start : start + 700], features[start : start + 700])
    assert table.mapped and len(table) == 3000
    found, positions = table.lookup(codes)
    assert found.all()
    gathered = table.gather(positions)
    assert gathered.dtype == np.float32  # converted exactly, as numpy's astype would
    np.testing.assert_array_equal(gathered, features.astype(np.float16).astype(np.float32))
    assert list(tmp_path.iterdir()) == []  # the backing files were unlinked when made


@pytest.mark.parametrize(
    ("text", "size"), [("2G", 2 << 30), ("512 MiB", 512 << 20), ("1000", 1000), ("1.5k", 1536)]
)
def test_table_budget_reads_sizes(monkeypatch, text, size):
    from lmencoders.table import table_budget

    monkeypatch.setenv("LMENCODERS_TABLE_BUDGET", text)
    assert table_budget() == size


def test_a_bad_table_budget_is_a_clear_error(monkeypatch):
    from lmencoders.errors import ConfigError
    from lmencoders.table import table_budget

    monkeypatch.setenv("LMENCODERS_TABLE_BUDGET", "lots")
    with pytest.raises(ConfigError, match="LMENCODERS_TABLE_BUDGET='lots'"):
        table_budget()
