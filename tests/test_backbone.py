from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import straightforward_features

import lmencoders
from lmencoders import ModelNotFoundError, TextTooLongError, load_description
from lmencoders.backbone import language_model
from lmencoders.tokens import TokenCache, tokenize_texts

TEXTS = [
    ["x position: 0.1 m", "z position: 1.25 m"],
    ["thigh angle: -0.00287 rad"],
    ["x position: 0.1 m", "z position: 1.25 m"],  # duplicate of the first
    ["foot angular velocity: 3.14159 rad/s", "leg angle: 0.5 rad", "torso angle: -1.0 rad"],
]


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_features_equal_a_straightforward_forward(tiny_lm, pooling):
    lm = language_model(tiny_lm)
    ours = lm.encode(TEXTS, ", ", pooling=pooling, batch_size=2)
    reference = straightforward_features(tiny_lm, [", ".join(t) for t in TEXTS], pooling)
    assert ours.shape == (4, 32)
    assert torch.allclose(ours, reference, atol=1e-4)
    assert torch.equal(ours[0], ours[2])


def test_long_texts_are_chunked_between_segments_and_pooled_by_token_count(tiny_lm):
    lm = language_model(tiny_lm)
    assert lm.window == 64
    description = load_description("finrl")
    obs = np.random.default_rng(0).uniform(0, 100, size=(2, 181))
    segments = description.format_segments(obs)
    tokenizer = lm.tokenizer
    assert len(tokenizer(", ".join(segments[0]))["input_ids"]) > 64  # really too long
    ours = lm.encode(segments, ", ")
    # By hand: greedy chunks of whole segments, each encoded alone, weighted by token count.
    for row in range(2):
        chunks, current = [], []
        for segment in segments[row]:
            trial = current + [segment]
            if current and len(tokenizer(", ".join(trial))["input_ids"]) > 64:
                chunks.append(", ".join(current))
                current = [segment]
            else:
                current = trial
        chunks.append(", ".join(current))
        counts = torch.tensor([len(tokenizer(c)["input_ids"]) for c in chunks], dtype=torch.float)
        assert counts.max() <= 64
        means = straightforward_features(tiny_lm, chunks)
        expected = (means * counts[:, None]).sum(0) / counts.sum()
        assert torch.allclose(ours[row], expected, atol=1e-4)


def test_a_tokenizer_that_merges_across_the_separator_still_gets_chunks_that_fit():
    """Chunks are packed by token counts read off the whole text; where a token spans the
    separator and a segment, those counts fall short (here: to nothing), and the text is
    packed again from its segments tokenised alone instead of failing or truncating."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"[UNK]": 0, "[CLS]": 1, "[SEP]": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex(r" ?[^ ]+"), behavior="isolated")
    raw.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )
    offsets = tokenizer("w0 w1", return_offsets_mapping=True)["offset_mapping"]
    assert offsets == [(0, 0), (0, 2), (2, 5), (0, 0)]  # " w1" is one token
    segments = [[f"w{i}" for i in range(10)], [f"v{i}" for i in range(10)]]
    for with_pieces in (False, True):
        chunks = tokenize_texts(tokenizer, segments, " ", 6, with_pieces=with_pieces)
        # alone, a segment and the separator are one token each: two segments per chunk
        assert [len(ids) for ids in chunks.ids] == [4] * 10
        np.testing.assert_array_equal(chunks.owner, [0] * 5 + [1] * 5)


def test_a_segment_longer_than_the_window_is_an_error_not_a_truncation(tiny_lm):
    lm = language_model(tiny_lm)
    with pytest.raises(TextTooLongError, match="64 tokens"):
        lm.encode([["a " * 100]], ", ")


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such directory"):
        language_model(str(tmp_path / "nowhere"))


def test_weights_hash_identifies_the_weights(tiny_lm, tmp_path):
    from conftest import make_tiny_lm

    other = make_tiny_lm(tmp_path / "other", seed=1)
    assert language_model(tiny_lm).weights_sha256 != language_model(str(other)).weights_sha256
    assert len(language_model(tiny_lm).weights_sha256) == 64


def _hub_cache_with(cache, repo_id: str, model_dir) -> None:
    """Lay a model out as huggingface_hub's cache does: models--org--name/snapshots/<rev>."""
    import shutil

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    revision = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(model_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)


def test_hub_ids_resolve_from_the_local_hugging_face_cache(tiny_lm, tmp_path, monkeypatch):
    from lmencoders.backbone import clear_loaded_models
    from lmencoders.features import clear_feature_caches

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _hub_cache_with(tmp_path / "hub", "someone/tiny-bert", tiny_lm)
    clear_loaded_models()
    lm = language_model("someone/tiny-bert")
    assert lm.weights_sha256 == language_model(tiny_lm).weights_sha256
    assert "snapshots" in lm.path
    features = lmencoders.embed_observations(
        np.zeros((2, 12)), "hopper", model="someone/tiny-bert", show_progress=False
    )
    assert features.shape == (2, 32)
    clear_loaded_models()
    clear_feature_caches()


def test_a_hub_id_that_is_not_cached_fails_fast_and_says_how_to_download(tmp_path, monkeypatch):
    import time

    from lmencoders.backbone import ALLOW_DOWNLOAD, clear_loaded_models

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.delenv(ALLOW_DOWNLOAD, raising=False)
    clear_loaded_models()
    started = time.perf_counter()
    with pytest.raises(
        ModelNotFoundError, match=rf"nor in the Hugging Face cache.*{ALLOW_DOWNLOAD}=1"
    ):
        language_model("someone/not-downloaded")
    assert time.perf_counter() - started < 5  # no network retries


def test_model_paths_may_be_pathlib_paths(tiny_lm):
    from pathlib import Path

    assert language_model(Path(tiny_lm)) is language_model(tiny_lm)
    factory = lmencoders.LMEncoderFactory(description="hopper", model=Path(tiny_lm))
    assert factory.model == tiny_lm and factory.create((12,)) is not None


def test_the_token_cache_gives_the_tokenizers_chunks_and_keeps_only_short_texts(tiny_lm):
    lm = language_model(tiny_lm)
    finrl = load_description("finrl").format_segments(
        np.random.default_rng(0).uniform(0, 100, size=(2, 181))
    )  # longer than the tiny LM's window of 64: chunked, never cached
    hopper = load_description("hopper").format_segments(
        np.random.default_rng(1).normal(size=(3, 12))
    )
    hopper = [text[:3] for text in hopper]  # short enough for one chunk
    texts = [hopper[0], finrl[0], hopper[1], hopper[0], finrl[1], hopper[2]]
    cache = TokenCache(limit=3)
    for _ in range(2):  # first from the tokenizer, then short texts from the cache
        ours = cache.chunks(lm.tokenizer, texts, ", ", 64)
        direct = tokenize_texts(lm.tokenizer, texts, ", ", 64)
        assert [list(ids) for ids in ours.ids] == [list(ids) for ids in direct.ids]
        np.testing.assert_array_equal(ours.owner, direct.owner)
        assert ours.num_texts == direct.num_texts == 6 and len(direct.ids) > 6
        assert len(cache) == 3  # the three distinct short texts
    cache.chunks(lm.tokenizer, [[s + " more" for s in text] for text in hopper], ", ", 64)
    assert len(cache) == 3  # over the limit: started over with the new texts


def test_tuned_encoding_is_the_same_with_cached_tokens(tiny_lm):
    lm = language_model(tiny_lm)
    segments = load_description("hopper").format_segments(
        np.random.default_rng(2).normal(size=(5, 12))
    )
    segments = [text[:4] for text in segments]  # within the tiny LM's window of 64 tokens
    parameters = {n: p.detach().clone() for n, p in lm.model.named_parameters() if "LayerNorm" in n}
    lm.token_cache = TokenCache()
    first = lm.encode(segments, ", ", parameters=parameters)
    assert len(lm.token_cache) == 5
    again = lm.encode(segments, ", ", parameters=parameters)
    assert torch.equal(first, again)
    assert torch.allclose(first, lm.encode(segments, ", "), atol=1e-6)  # frozen path, no cache
