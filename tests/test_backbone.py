from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import straightforward_features

from lmencoders import ModelNotFoundError, TextTooLongError, load_description
from lmencoders.backbone import language_model

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
