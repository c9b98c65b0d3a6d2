from __future__ import annotations

import dataclasses
import io
import pickle

import d3rlpy
import numpy as np
import pytest
import torch
from conftest import quiet_fit

import lmencoders
from lmencoders import DescriptionError, LMEncoderFactory, ModelMismatchError
from lmencoders.backbone import Frozen, clear_loaded_models, language_model, loaded_bodies
from lmencoders.features import clear_feature_caches, scaler_on
from lmencoders.train import ALGORITHMS

TUNINGS = sorted(lmencoders.TUNING_MODES)


def build(config_cls, factory: LMEncoderFactory, **kwargs):
    """An algorithm whose every encoder (actor, critic, value, imitator) is the LM encoder."""
    names = [f.name for f in dataclasses.fields(config_cls) if f.name.endswith("encoder_factory")]
    config = config_cls(
        **{n: factory for n in names},
        observation_scaler=factory.observation_scaler,
        batch_size=16,
        **kwargs,
    )
    return config.create(device="cpu")


def factory_for(tiny_lm: str, tuning: str = "frozen", **kwargs) -> LMEncoderFactory:
    settings = dict(
        description="hopper",
        model=tiny_lm,
        tuning=tuning,
        hidden_units=[32, 32],
        observation_scaler=d3rlpy.preprocessing.StandardObservationScaler(),
    )
    return LMEncoderFactory(**(settings | kwargs))


fit = quiet_fit


def td3_plus_bc(factory: LMEncoderFactory, scaler) -> d3rlpy.algos.TD3PlusBC:
    """TD3+BC (batch 16) with ``factory`` for actor and critic and ``scaler`` as its own."""
    return d3rlpy.algos.TD3PlusBCConfig(
        actor_encoder_factory=factory,
        critic_encoder_factory=factory,
        observation_scaler=scaler,
        batch_size=16,
    ).create()


def checkpoint_state(algo) -> dict[str, torch.Tensor]:
    """Every tensor a saved ``.d3`` file holds, flattened to name -> tensor."""
    raw = io.BytesIO()
    algo.impl.save_model(raw)
    raw.seek(0)
    saved = torch.load(raw, weights_only=False)
    flat = {}
    for module_name, state in saved.items():
        if isinstance(state, dict) and "state" not in state:  # modules, not optimizers
            flat.update({f"{module_name}.{k}": v for k, v in state.items()})
    return flat


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_continuous_algorithm_trains_with_lm_encoders(name, tiny_lm, hopper_dataset):
    algo = build(ALGORITHMS[name], factory_for(tiny_lm))
    fit(algo, hopper_dataset)
    obs = hopper_dataset.episodes[0].observations[:5]
    actions = algo.predict(obs)
    assert actions.shape == (5, 3) and np.isfinite(actions).all()


def test_frozen_lm_is_bitwise_unchanged_and_stored_once(tiny_lm, hopper_dataset):
    lm = language_model(tiny_lm)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    algo = build(ALGORITHMS["td3+bc"], factory_for(tiny_lm))
    fit(algo, hopper_dataset, steps=20)  # 20 soft syncs of every target network
    after = lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # No encoder registers an LM tensor: the body is not in any optimiser or checkpoint.
    lm_storage = {p.data_ptr() for p in lm.model.parameters()}
    algo_params = [
        p for m in algo.impl.modules.get_torch_modules().values() for p in m.parameters()
    ]
    assert not lm_storage & {p.data_ptr() for p in algo_params}
    # One body per (model, variant, device) however many encoders were built (TD3+BC: 6).
    plain = [b for b in loaded_bodies() if b.path == lm.path and b.model is lm.model]
    assert len(plain) == 1


@pytest.mark.parametrize("tuning", TUNINGS)
def test_checkpoint_holds_only_trained_tensors_and_the_lm_identity(tuning, tiny_lm, hopper_dataset):
    algo = build(ALGORITHMS["td3+bc"], factory_for(tiny_lm, tuning))
    fit(algo, hopper_dataset)
    state = checkpoint_state(algo)
    lm = language_model(tiny_lm)
    hashes = [v for k, v in state.items() if k.endswith("lm_weights_sha256")]
    assert len(hashes) == 6 and all(bytes(h.tolist()).hex() == lm.weights_sha256 for h in hashes)
    lm_keys = {k.split("lm_parameters.")[1] for k in state if "lm_parameters." in k}
    trainable = {
        n.replace(".", "__")
        for n in factory_for(tiny_lm, tuning)
        .tuning_mode()
        .trainable_names(language_model(tiny_lm, factory_for(tiny_lm, tuning).tuning_mode()).model)
    }
    assert lm_keys == trainable
    if tuning == "frozen":
        assert not lm_keys
    if tuning == "ln_embed":
        assert lm_keys and all("LayerNorm" in k or "word_embeddings" in k for k in lm_keys)
    if tuning == "lora":
        assert lm_keys and all("lora_" in k for k in lm_keys)


@pytest.mark.parametrize("tuning", TUNINGS)
def test_save_load_learnable_gives_identical_predictions(tuning, tiny_lm, hopper_dataset, tmp_path):
    algo = build(ALGORITHMS["td3+bc"], factory_for(tiny_lm, tuning))
    fit(algo, hopper_dataset)
    path = tmp_path / "model.d3"
    algo.save(str(path))
    loaded = d3rlpy.load_learnable(str(path))
    obs = np.concatenate([ep.observations for ep in hopper_dataset.episodes])[:20]
    obs = np.concatenate([obs, obs[:3] + 0.123])  # also observations the cache has not seen
    assert np.array_equal(algo.predict(obs), loaded.predict(obs))
    actions = algo.predict(obs)
    assert np.array_equal(algo.predict_value(obs, actions), loaded.predict_value(obs, actions))


def test_tuned_modes_train_their_tensors_and_never_touch_the_shared_body(tiny_lm, hopper_dataset):
    factory = factory_for(tiny_lm, "ln_embed")
    lm = language_model(tiny_lm, factory.tuning_mode())
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    algo = build(ALGORITHMS["td3+bc"], factory)
    algo.build_with_dataset(hopper_dataset)
    policy_features = algo.impl.modules.policy._encoder.features
    initial = {k: v.detach().clone() for k, v in policy_features.lm_parameters.items()}
    fit(algo, hopper_dataset, steps=6)
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    changed = [
        k for k, v in policy_features.lm_parameters.items() if not torch.equal(v, initial[k])
    ]
    assert any("LayerNorm" in k for k in changed) and any("word_embeddings" in k for k in changed)


@pytest.mark.parametrize("tuning", TUNINGS)
def test_lm_stays_in_eval_mode_during_updates(tuning, tiny_lm, hopper_dataset):
    factory = factory_for(tiny_lm, tuning)
    lm = language_model(tiny_lm, factory.tuning_mode())
    modes: list[bool] = []
    handle = lm.model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    try:
        algo = build(ALGORITHMS["td3+bc"], factory)
        fit(algo, hopper_dataset)
        fit(algo, hopper_dataset)  # a second fit sees new batches (frozen: cache misses)
    finally:
        handle.remove()
    assert modes and not any(modes)


def test_frozen_encoders_look_precomputed_features_up(tiny_lm, hopper_dataset, monkeypatch):
    factory = factory_for(tiny_lm, max_length=48)
    factory.precompute(hopper_dataset, show_progress=False)
    texts: list[str] = []
    lm_class = type(language_model(tiny_lm))
    original = lm_class.encode

    def recording(self, segments, separator, *args, **kwargs):
        texts.extend(separator.join(s) for s in segments)
        return original(self, segments, separator, *args, **kwargs)

    monkeypatch.setattr(lm_class, "encode", recording)
    algo = build(ALGORITHMS["td3+bc"], factory)
    fit(algo, hopper_dataset, steps=10)
    # The LM only sees d3rlpy's output-size probes (2 random rows per encoder) and the zero
    # next-observation of terminal steps; every dataset observation is a table hit.
    observations = np.concatenate([ep.observations for ep in hopper_dataset.episodes])
    assert not set(texts) & set(factory.load_description().format(observations))
    assert len(texts) < 20


def test_scaled_inputs_are_turned_back_into_raw_values_for_the_text(tiny_lm, hopper_dataset):
    factory = factory_for(tiny_lm)
    algo = build(ALGORITHMS["bc"], factory)
    fit(algo, hopper_dataset, steps=1)
    obs = hopper_dataset.episodes[0].observations[:4]
    features = algo.impl.modules.imitator._encoder.features
    scaled = factory.observation_scaler.transform(torch.as_tensor(obs))
    assert torch.allclose(features.raw_observations(scaled), torch.as_tensor(obs), atol=1e-5)


def test_loading_with_other_lm_weights_is_refused(tmp_path, hopper_dataset):
    from conftest import make_tiny_lm

    path = make_tiny_lm(tmp_path / "lm", seed=0)
    algo = build(ALGORITHMS["bc"], factory_for(str(path)))
    fit(algo, hopper_dataset, steps=1)
    algo.save(str(tmp_path / "model.d3"))
    make_tiny_lm(path, seed=1)  # same name, other weights
    clear_loaded_models()
    clear_feature_caches()
    with pytest.raises(ModelMismatchError, match="sha256"):
        d3rlpy.load_learnable(str(tmp_path / "model.d3"))


def test_wrong_observation_size_is_an_error(tiny_lm):
    factory = LMEncoderFactory(description="hopper-v5", model=tiny_lm)
    with pytest.raises(DescriptionError, match="11 dimensions.*observations have 12"):
        factory.create((12,))


def test_factory_is_json_config_and_path_descriptions_are_stored_inline(tiny_lm, tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\ndimensions:\n" + "".join(f"  - label: d{i}\n" for i in range(3)))
    factory = LMEncoderFactory(description=str(path), model=tiny_lm, tuning="lora")
    assert factory.description.startswith("name: mine")
    data = factory.serialize_to_dict()
    assert pickle.loads(pickle.dumps(data)) == data
    again = LMEncoderFactory.deserialize_from_dict(data)
    assert again == factory
    with pytest.raises(ValueError, match="unknown tuning 'lorra'"):
        LMEncoderFactory(description="hopper", tuning="lorra")


def test_shared_q_function_encoders_work(tiny_lm, hopper_dataset):
    algo = build(
        ALGORITHMS["td3+bc"],
        factory_for(tiny_lm, "ln_embed"),
        q_func_factory=d3rlpy.models.MeanQFunctionFactory(share_encoder=True),
    )
    algo.build_with_dataset(hopper_dataset)
    critics = algo.impl.modules.q_funcs
    encoder = critics[0].encoder
    assert all(c.encoder is encoder for c in critics)
    before = {k: v.detach().clone() for k, v in encoder.features.lm_parameters.items()}
    fit(algo, hopper_dataset, steps=2)
    assert all(c.encoder is encoder for c in algo.impl.modules.q_funcs)
    after = encoder.features.lm_parameters
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the shared LM trained


def test_bodies_are_shared_across_tuning_modes(tiny_lm):
    from lmencoders.backbone import clear_loaded_models, loaded_bodies

    clear_loaded_models()
    modes = list(lmencoders.TUNING_MODES)
    assert {"frozen", "ln_embed", "lora", "full"} <= set(modes)
    for _ in range(2):  # a second round of encoders loads nothing more
        for tuning in modes:
            factory_for(tiny_lm, tuning).create((12,))
            factory_for(tiny_lm, tuning).create_with_action((12,), 3)
    bodies = loaded_bodies()
    variants = {factory_for(tiny_lm, t).tuning_mode().body_variant for t in modes}
    assert len(bodies) == len(variants) == 2  # the plain body, and one with LoRA adapters
    plain = language_model(tiny_lm, Frozen())
    for tuning in modes:
        body = language_model(tiny_lm, factory_for(tiny_lm, tuning).tuning_mode())
        assert body in bodies and (body is plain) == (tuning != "lora")


@pytest.mark.parametrize("share, passes", [(False, 65), (True, 40)])
def test_critics_sharing_an_encoder_run_the_lm_once_per_batch(
    share, passes, tiny_lm, hopper_dataset, lm_texts, monkeypatch
):
    from lmencoders.backbone import LanguageModel

    algo = build(
        ALGORITHMS["td3+bc"],
        factory_for(tiny_lm, "ln_embed"),
        q_func_factory=d3rlpy.models.MeanQFunctionFactory(share_encoder=share),
    )
    algo.build_with_dataset(hopper_dataset)
    prepared = []
    original = LanguageModel.prepare
    monkeypatch.setattr(
        LanguageModel, "prepare", lambda *a, **k: prepared.append(1) or original(*a, **k)
    )
    lm_texts.clear()
    fit(algo, hopper_dataset, steps=10)
    # TD3+BC per update: critic step 5 encoder calls (target policy, 2 target critics, 2
    # critics), actor step every 2nd update 3 more; shared critics: 3 + 1 of those are one pass.
    assert len(lm_texts) == passes
    # The host work (text, tokens, batches) once per batch tensor: obs and next_obs.
    assert len(prepared) == 2 * 10


def test_unreachable_tokens_are_an_error_not_a_silently_frozen_row(tiny_lm):
    from lmencoders import UnreachableTokenError

    lm = language_model(tiny_lm)
    with pytest.raises(UnreachableTokenError, match="not among the trainable embedding rows"):
        lm.encode([["x position: 1.0 m"]], ", ", vocabulary=np.array([0, 1, 2, 3]))


def test_one_table_lookup_per_distinct_batch_tensor_in_an_update(
    tiny_lm, hopper_dataset, monkeypatch
):
    from lmencoders.features import FrozenFeatures

    factory = factory_for(tiny_lm)
    factory.precompute(hopper_dataset, cache_dir=False, show_progress=False)
    algo = build(ALGORITHMS["td3+bc"], factory)
    fit(algo, hopper_dataset, steps=1)
    lookups: list[int] = []
    fallbacks: list[int] = []
    scaled, unscaled = FrozenFeatures._of_scaled, FrozenFeatures.__call__
    monkeypatch.setattr(
        FrozenFeatures,
        "_of_scaled",
        lambda self, x, *a: lookups.append(len(x)) or scaled(self, x, *a),
    )
    monkeypatch.setattr(
        FrozenFeatures,
        "__call__",
        lambda self, o, *a, **k: fallbacks.append(len(o)) or unscaled(self, o, *a, **k),
    )
    for _ in range(4):
        algo.update(hopper_dataset.sample_transition_batch(16))
    # obs and next_obs: two lookups per update for the six encoders' 6.5 calls, all of them
    # exact hits on the scaled inputs (no unscaling, no LM).
    assert lookups == [16] * 8
    assert fallbacks == []


def _lm_encoders(algo) -> list:
    modules = algo.impl.modules
    found = []
    for field in dataclasses.fields(modules):
        module = getattr(modules, field.name)
        if isinstance(module, torch.nn.Module):
            found += [
                m for m in module.modules() if isinstance(m, lmencoders.encoders.TextFeatures)
            ]
    return found


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_a_factory_without_a_scaler_uses_the_algorithms_own(name, tiny_lm, hopper_dataset):
    factory = factory_for(tiny_lm, observation_scaler=None)
    scaler = d3rlpy.preprocessing.StandardObservationScaler()
    config_cls = ALGORITHMS[name]
    names = [f.name for f in dataclasses.fields(config_cls) if f.name.endswith("encoder_factory")]
    algo = config_cls(**{n: factory for n in names}, observation_scaler=scaler, batch_size=16)
    algo = algo.create()
    fit(algo, hopper_dataset, steps=1)
    features = _lm_encoders(algo)
    assert features and all(f.observation_scaler is scaler for f in features)
    obs = hopper_dataset.episodes[0].observations[:3]
    scaled = scaler.transform(torch.as_tensor(obs))
    assert torch.allclose(features[0].raw_observations(scaled), torch.as_tensor(obs), atol=1e-5)


def test_an_unfitted_factory_scaler_defers_to_the_algorithms(tiny_lm, hopper_dataset):
    factory = factory_for(tiny_lm)  # its own StandardObservationScaler object, never fitted
    scaler = d3rlpy.preprocessing.StandardObservationScaler()
    algo = td3_plus_bc(factory, scaler)
    fit(algo, hopper_dataset, steps=1)
    assert all(f.observation_scaler is scaler for f in _lm_encoders(algo))


def test_a_factory_scaler_that_contradicts_the_algorithm_is_refused(tiny_lm, hopper_dataset):
    from lmencoders.errors import ConfigError

    fitted = d3rlpy.preprocessing.StandardObservationScaler(mean=np.zeros(12), std=np.ones(12))
    factory = factory_for(tiny_lm, observation_scaler=fitted)
    algo = td3_plus_bc(factory, d3rlpy.preprocessing.StandardObservationScaler())
    with pytest.raises(ConfigError, match="another object than TD3PlusBC's.*Leave the factory's"):
        fit(algo, hopper_dataset, steps=1)
    algo = td3_plus_bc(factory, None)
    with pytest.raises(ConfigError, match="TD3PlusBC has none"):
        fit(algo, hopper_dataset, steps=1)


@pytest.mark.parametrize("tuning", ["frozen", "ln_embed"])
def test_building_leaves_the_algorithms_scaler_unpinned(tuning, tiny_lm, hopper_dataset):
    """d3rlpy probes new encoders with CPU tensors before moving them to the algorithm's device,
    and its scalers keep their torch statistics on the first device they see: had the encoders
    used the algorithm's own scaler in that probe, the first CUDA update would fail with
    'Expected all tensors to be on the same device' (seen on an H100)."""
    scaler = d3rlpy.preprocessing.StandardObservationScaler()
    factory = factory_for(tiny_lm, tuning, observation_scaler=scaler)
    algo = td3_plus_bc(factory, scaler)
    if tuning == "frozen":
        factory.precompute(hopper_dataset, cache_dir=False, show_progress=False)
    scaler.fit_with_transition_picker(
        hopper_dataset.episodes, d3rlpy.dataset.BasicTransitionPicker()
    )
    algo.build_with_dataset(hopper_dataset)  # builds and probes every encoder
    assert _lm_encoders(algo)
    assert scaler._torch_mean is None  # the probe went through a copy of the scaler
    copy = scaler_on(scaler, torch.device("cpu"))
    assert copy is not scaler and copy is scaler_on(scaler, torch.device("cpu"))
    obs = torch.as_tensor(hopper_dataset.episodes[0].observations[:5])
    assert torch.equal(copy.transform(obs), scaler.transform(obs))  # the same bits
    scaler.mean = scaler.mean + 1.0  # refitted: a new copy with the new statistics
    assert torch.equal(
        scaler_on(scaler, torch.device("cpu")).transform(obs),
        (obs - torch.as_tensor(scaler.mean, dtype=torch.float32))
        / (torch.as_tensor(scaler.std, dtype=torch.float32) + scaler.eps),
    )


def test_encoders_reading_one_tensor_share_its_host_work_and_see_in_place_changes(
    tiny_lm, monkeypatch
):
    from lmencoders.backbone import LanguageModel

    factory = factory_for(tiny_lm, "ln_embed", observation_scaler=None)
    actor, critic = factory.create((12,)), factory.create((12,))
    prepared = []
    original = LanguageModel.prepare
    monkeypatch.setattr(
        LanguageModel, "prepare", lambda *a, **k: prepared.append(1) or original(*a, **k)
    )
    x = torch.as_tensor(np.random.default_rng(0).normal(size=(6, 12)), dtype=torch.float32)
    with torch.no_grad():
        first, second = actor(x), critic(x)
        assert len(prepared) == 1  # one text / token preparation for both encoders
        alone = critic(x.clone())  # a new tensor with the same values: prepared anew
        assert len(prepared) == 2 and torch.equal(second, alone)
        assert torch.equal(actor(x), first)
        x[0, 3] += 1.0  # changed in place: its old preparation must not be reused
        changed = actor(x)
        assert len(prepared) == 3 and not torch.equal(changed[0], first[0])
        assert torch.equal(changed[1:], first[1:])
