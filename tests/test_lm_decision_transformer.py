"""LM Decision Transformer: L_cos and its K-means centroids against direct computations, the
causal reading of tokens, the tuning modes' invariants, saving and loading, d3rlpy's fit."""

from __future__ import annotations

import d3rlpy
import numpy as np
import pytest
import torch
import transformers
from conftest import make_tiny_causal_lm, make_tiny_lm, neorl_arrays, quiet_fit

import lmencoders
from lmencoders.algos.torch.lm_decision_transformer_impl import causal_mask
from lmencoders.alignment import annealed_weight, cosine_alignment_loss, language_centroids
from lmencoders.backbone import language_model
from lmencoders.errors import ConfigError, ModelMismatchError
from lmencoders.language_loss import TextCorpus


def config(tiny_lm: str, **overrides) -> lmencoders.LMDecisionTransformerConfig:
    settings = dict(
        model=tiny_lm, context_size=4, batch_size=8, cos_clusters=8, max_timestep=100,
        embed_dropout=0.0,
    )  # fmt: skip
    return lmencoders.LMDecisionTransformerConfig(**{**settings, **overrides})


def test_alignment_loss_is_minus_the_mean_best_cosine():
    torch.manual_seed(0)
    inputs, centroids = torch.randn(2, 5, 8), torch.randn(3, 8)
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 0, 1, 1, 1]])
    best = []
    for b in range(2):
        for t in range(5):
            if mask[b, t]:
                cosines = [
                    float(torch.dot(inputs[b, t], c) / (inputs[b, t].norm() * c.norm()))
                    for c in centroids
                ]
                best.append(max(cosines))
    loss = cosine_alignment_loss(inputs, centroids, mask)
    assert float(loss) == pytest.approx(-np.mean(best), abs=1e-6)
    assert float(cosine_alignment_loss(centroids[None], centroids)) == pytest.approx(-1.0)


def test_centroids_are_a_kmeans_fixed_point_and_cached(tiny_lm, tmp_path):
    lm = language_model(tiny_lm)
    centroids = language_centroids(lm, 8, cache_dir=tmp_path)
    embeddings = lm.model.get_input_embeddings().weight.detach()
    assert centroids.shape == (8, embeddings.shape[1])
    nearest = torch.cdist(embeddings, centroids).argmin(1)
    for j in range(8):  # Lloyd's fixed point: each centroid is the mean of its members
        members = embeddings[nearest == j]
        assert len(members) and torch.allclose(members.mean(0), centroids[j], atol=1e-4)
    cached = list((tmp_path / "centroids").glob("*.npy"))
    assert len(cached) == 1
    assert torch.equal(language_centroids(lm, 8, cache_dir=tmp_path), centroids)
    cached[0].write_bytes(b"garbage")  # a broken cache file is computed again
    assert torch.equal(language_centroids(lm, 8, cache_dir=tmp_path), centroids)


def test_annealed_weight():
    assert annealed_weight(0.1, 0, 0) == annealed_weight(0.1, 10**6, 0) == 0.1
    assert annealed_weight(0.1, 0, 5000) == pytest.approx(0.1, rel=0.01)
    assert annealed_weight(0.1, 2500, 5000) == pytest.approx(0.05)
    assert annealed_weight(0.1, 5000, 5000) < 0.001
    assert annealed_weight(0.1, 10**9, 5000) == 0.0


def test_causal_mask_lets_a_token_see_itself_and_the_real_past():
    mask = causal_mask(torch.tensor([[0, 1, 1]]))[0, 0]
    allowed = [[True, False, False], [False, True, False], [False, True, True]]
    assert (mask == 0).tolist() == allowed  # additive: 0 to look, the minimum not to
    assert (mask[~torch.tensor(allowed)] == torch.finfo(torch.float32).min).all()


@pytest.fixture
def built(tiny_lm, hopper_dataset):
    dt = config(tiny_lm, tuning="full").create()
    dt.build_with_dataset(hopper_dataset)
    return dt


def test_tokens_are_read_causally_and_front_padding_changes_nothing(built):
    transformer = built.impl.modules.transformer.eval()
    torch.manual_seed(0)
    obs, act, rtg = torch.randn(1, 4, 12), torch.rand(1, 4, 3), torch.randn(1, 4, 1)
    steps, keep = torch.arange(1, 5)[None], torch.ones(1, 4)
    transformer.train()  # every token, no acting shortcut
    with torch.no_grad():
        base = transformer(obs, act, rtg, steps, keep)
        later = act.clone()
        later[0, 2] += 1.0  # the action at step 3 is read after the state at step 3
        moved = transformer(obs, later, rtg, steps, keep)
        assert torch.allclose(base[0, :3], moved[0, :3], atol=1e-5)
        assert not torch.allclose(base[0, 3], moved[0, 3])
        # the last three steps, padded with one zero step in front
        pad = lambda x: torch.cat([torch.zeros_like(x[:, :1]), x[:, 1:]], 1)  # noqa: E731
        padded = transformer(pad(obs), pad(act), pad(rtg), pad(steps), pad(keep))
        alone = transformer(obs[:, 1:], act[:, 1:], rtg[:, 1:], steps[:, 1:], keep[:, 1:])
        assert torch.allclose(padded[0, 1:], alone[0], atol=1e-5)


@pytest.mark.parametrize(
    ("tuning", "trained"),
    [("frozen", lambda n: False), ("lora", lambda n: "lora_" in n), ("full", lambda n: True)],
)
def test_tuning_modes_keep_the_shared_body_and_hold_only_what_they_train(
    tiny_lm, hopper_dataset, tmp_path, tuning, trained
):
    body = language_model(tiny_lm).model
    before = {k: v.clone() for k, v in body.state_dict().items()}
    dt = config(tiny_lm, tuning=tuning).create()
    quiet_fit(dt, hopper_dataset, 3)
    for name, tensor in body.state_dict().items():  # the shared body is bitwise untouched
        assert torch.equal(tensor, before[name]), name
    saved = dt.impl.modules.transformer.state_dict()
    lm_names = [k.split("lm_parameters.")[1] for k in saved if "lm_parameters." in k]
    assert all(trained(n.replace("__", ".")) for n in lm_names)
    word = language_model(tiny_lm).input_embedding_name
    assert word.replace(".", "__") not in lm_names  # never read: inputs arrive as embeddings
    if tuning == "frozen":
        assert lm_names == []
    else:
        assert lm_names
    folder = lmencoders.save_model(dt, tmp_path / "dt")
    again = lmencoders.load_model(folder)
    window = np.stack([hopper_dataset.episodes[0].observations[:4]])
    for algo in (dt, again):
        algo.impl.modules.transformer.eval()
    actor, reloaded = dt.as_stateful_wrapper(10.0), again.as_stateful_wrapper(10.0)
    for t in range(3):
        np.testing.assert_array_equal(
            actor.predict(window[0, t], 1.0), reloaded.predict(window[0, t], 1.0)
        )


def test_a_checkpoint_of_other_lm_weights_is_refused(tiny_lm, hopper_dataset, tmp_path):
    dt = config(tiny_lm, tuning="lora").create()
    quiet_fit(dt, hopper_dataset, 2)
    folder = lmencoders.save_model(dt, tmp_path / "dt")
    other = str(make_tiny_lm(tmp_path / "other-lm", seed=7))
    model_json = folder / "model.json"
    model_json.write_text(model_json.read_text().replace(tiny_lm, other))
    with pytest.raises(ModelMismatchError, match="LM weights sha256"):
        lmencoders.load_model(folder)


def trajectory_batch(dataset, context: int = 4):
    """One window per episode, as the impl's losses read them."""
    from d3rlpy.dataset import TrajectoryMiniBatch
    from d3rlpy.torch_utility import TorchTrajectoryMiniBatch

    slicer = d3rlpy.dataset.BasicTrajectorySlicer()
    trajectories = [slicer(e, e.transition_count - 1, context) for e in dataset.episodes]
    return TorchTrajectoryMiniBatch.from_batch(
        TrajectoryMiniBatch.from_partial_trajectories(trajectories), device="cpu:0"
    )


def test_alignment_loss_trains_and_fades(built, hopper_dataset):
    batch = trajectory_batch(hopper_dataset)
    impl = built.impl
    with torch.no_grad():
        early, late = impl.losses(batch, 0), impl.losses(batch, 10**6)
    assert "cos_loss" in early and -1.0 <= float(early["cos_loss"]) <= 1.0
    weight = annealed_weight(0.1, 0, 5000)
    assert float(early["loss"]) == pytest.approx(
        float(early["action_loss"] + weight * early["cos_loss"]), rel=1e-5
    )
    assert "cos_loss" not in late and torch.equal(late["loss"], late["action_loss"])


def test_state_tokens_from_language_features(tiny_lm, hopper_dataset):
    factory = lmencoders.LMEncoderFactory(description="hopper", model=tiny_lm, tuning="frozen")
    dt = config(tiny_lm, tuning="lora", encoder_factory=factory, cos_weight=0.0).create()
    quiet_fit(dt, hopper_dataset, 2)
    actor = dt.as_stateful_wrapper(10.0)
    action = actor.predict(hopper_dataset.episodes[0].observations[0], 0.0)
    assert action.shape == (3,) and np.isfinite(action).all()


def test_settings_are_checked(tiny_lm, hopper_dataset):
    with pytest.raises(ConfigError, match="unknown tuning"):
        config(tiny_lm, tuning="half")
    with pytest.raises(ConfigError, match="projection"):
        config(tiny_lm, projection="conv")
    dt = config(tiny_lm, context_size=30).create()  # the tiny LM has 64 positions
    with pytest.raises(ConfigError, match=r"90 tokens.*64 positions.*context_size <= 21"):
        dt.build_with_dataset(hopper_dataset)


def test_random_initialisation_is_the_same_architecture_trained_whole(tiny_lm, hopper_dataset):
    with pytest.raises(ConfigError, match="trains whole"):
        config(tiny_lm, pretrained=False, tuning="lora")
    dt = config(tiny_lm, pretrained=False).create()
    quiet_fit(dt, hopper_dataset, 2)
    body = dt.impl.modules.transformer.body
    pretrained = language_model(tiny_lm).model.state_dict()
    random = body.random_body.state_dict()
    assert random.keys() == pretrained.keys()
    assert not torch.equal(
        random["encoder.layer.0.output.dense.weight"],
        pretrained["encoder.layer.0.output.dense.weight"],
    )


def test_attention_maps_are_causal_distributions_and_drawn(tiny_lm, hopper_dataset, tmp_path):
    from lmencoders.attention import attention_maps, draw_attention
    from lmencoders.cli import main

    data = tmp_path / "Hopper-v5-low-4-train.npz"
    np.savez(data, **neorl_arrays(4, steps=20))
    folders = []
    for pretrained in (True, False):
        dt = config(tiny_lm, pretrained=pretrained, cos_weight=0.0).create()
        quiet_fit(dt, lmencoders.load_dataset(data).buffer, 2)
        folders.append(lmencoders.save_model(dt, tmp_path / f"dt-{pretrained}"))
    maps = attention_maps(folders[0], data, trajectory=1, start=2)
    assert maps.labels[:3] == ["R3", "s3", "a3"] and len(maps.labels) == 12
    for layer in maps.layers:
        np.testing.assert_allclose(layer.sum(-1), 1.0, atol=1e-5)
        assert np.allclose(np.triu(layer, k=1), 0.0)  # nothing attends to the future
    png = draw_attention([maps, attention_maps(folders[1], data)], tmp_path / "a.png")
    assert png.stat().st_size > 10_000
    out = tmp_path / "cli.png"
    args = ["attention", *map(str, folders), "--dataset", str(data), "--out", str(out)]
    assert main(args) == 0 and out.stat().st_size > 10_000
    with pytest.raises(ConfigError, match="trajectory 9 of 4"):
        attention_maps(folders[0], data, trajectory=9)
    with pytest.raises(ConfigError, match="trajectory 1 has"):
        attention_maps(folders[0], data, trajectory=1, start=10_000)


CORPUS = "the thigh angle of the leg, the foot velocity and the torso position. "


@pytest.fixture(scope="module")
def tiny_causal_lm(tmp_path_factory) -> str:
    return str(make_tiny_causal_lm(tmp_path_factory.mktemp("lm") / "tiny-gpt2"))


def language_config(tiny_causal_lm: str, corpus, **overrides):
    settings = dict(
        tuning="lora", cos_weight=0.0, language_weight=0.5, language_corpus=str(corpus),
        language_batch_size=3, language_length=16,
    )  # fmt: skip
    return config(tiny_causal_lm, **{**settings, **overrides})


def test_language_loss_is_the_lm_heads_next_token_cross_entropy(
    tiny_causal_lm, hopper_dataset, tmp_path
):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS * 10)
    dt = language_config(tiny_causal_lm, corpus).create()
    dt.build_with_dataset(hopper_dataset)
    tokenizer = language_model(tiny_causal_lm).tokenizer
    stream = tokenizer(corpus.read_text(), add_special_tokens=False)["input_ids"]
    torch.manual_seed(0)
    ids = TextCorpus(corpus, tokenizer, 16).sample(3)
    assert ids.shape == (3, 17)
    for row in ids.tolist():  # each window is a stretch of the corpus
        start = next(i for i in range(len(stream)) if stream[i : i + 17] == row)
        assert start <= len(stream) - 17
    direct = transformers.GPT2LMHeadModel.from_pretrained(tiny_causal_lm).eval()
    expected = direct(ids, labels=ids).loss  # Hugging Face shifts the labels itself
    body = dt.impl.modules.transformer.body
    with torch.no_grad():
        assert float(body.language_loss(ids)) == pytest.approx(float(expected), rel=1e-5)
        losses = dt.impl.losses(trajectory_batch(hopper_dataset), 0)
    assert float(losses["loss"]) == pytest.approx(
        float(losses["action_loss"] + 0.5 * losses["language_loss"]), rel=1e-5
    )


def test_a_corpus_is_its_lines_tokens_in_order_read_in_blocks(
    tiny_causal_lm, tmp_path, monkeypatch
):
    import lmencoders.language_loss as language_loss

    monkeypatch.setattr(language_loss, "BLOCK_LINES", 2)  # several blocks from five lines
    lines = [f"the leg {i} angle\n" for i in range(5)]
    corpus = tmp_path / "lines.txt"
    corpus.write_text("".join(lines) + "\n")  # an empty last line adds no token
    tokenizer = language_model(tiny_causal_lm).tokenizer
    expected = [t for line in lines for t in tokenizer(line, add_special_tokens=False)["input_ids"]]
    assert TextCorpus(corpus, tokenizer, 4).ids.tolist() == expected
    corpus.write_bytes(b"the leg \xff\xfe")
    with pytest.raises(ConfigError, match="lines.txt: cannot read it as UTF-8"):
        TextCorpus(corpus, tokenizer, 4)


def test_language_loss_trains_adapters_only_and_loading_needs_no_corpus(
    tiny_causal_lm, hopper_dataset, tmp_path
):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS * 10)
    body = language_model(tiny_causal_lm).model
    before = {k: v.clone() for k, v in body.state_dict().items()}
    dt = language_config(tiny_causal_lm, corpus).create()
    quiet_fit(dt, hopper_dataset, 3)
    for name, tensor in body.state_dict().items():  # the shared body is bitwise untouched
        assert torch.equal(tensor, before[name]), name
    saved = dt.impl.modules.transformer.state_dict()
    lm_names = [k for k in saved if "lm_parameters." in k]
    assert lm_names and all("lora_" in n for n in lm_names)
    folder = lmencoders.save_model(dt, tmp_path / "dt")
    corpus.unlink()  # the corpus is read by training only
    again = lmencoders.load_model(folder)
    action = again.as_stateful_wrapper(10.0).predict(hopper_dataset.episodes[0].observations[0], 0)
    assert action.shape == (3,) and np.isfinite(action).all()


def test_language_loss_settings_are_checked(tiny_lm, tiny_causal_lm, hopper_dataset, tmp_path):
    with pytest.raises(ConfigError, match="needs language_corpus"):
        config(tiny_causal_lm, language_weight=0.1)
    with pytest.raises(ConfigError, match="language_weight must be >= 0"):
        config(tiny_causal_lm, language_weight=-1.0, language_corpus="x.txt")
    corpus = tmp_path / "short.txt"
    corpus.write_text("the leg")
    minilm_like = language_config(tiny_lm, corpus).create()  # an encoder: no LM head
    with pytest.raises(ConfigError, match=r"needs a causal LM with an LM head.*BertModel"):
        minilm_like.build_with_dataset(hopper_dataset)
    too_long = language_config(tiny_causal_lm, corpus, language_length=65).create()
    with pytest.raises(ConfigError, match="language_length 65 is longer than .* 64 positions"):
        too_long.build_with_dataset(hopper_dataset)
    short = language_config(tiny_causal_lm, corpus).create()
    with pytest.raises(ConfigError, match=r"short.txt: \d+ tokens, fewer than one window"):
        quiet_fit(short, hopper_dataset, 1)
    missing = language_config(tiny_causal_lm, tmp_path / "none.txt").create()
    with pytest.raises(ConfigError, match="none.txt: cannot read it"):
        quiet_fit(missing, hopper_dataset, 1)
