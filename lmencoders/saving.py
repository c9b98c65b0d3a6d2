"""Saved models that execute nothing when loaded: a JSON config and a weights-only state dict.

d3rlpy's ``.d3`` file is a pickle, and unpickling a file from a stranger runs whatever code
it holds. :func:`save_model` writes ``model.json`` (d3rlpy's own serialised config, with the
observation shape and action size) and ``model.pt`` (every module's and optimiser's state
dict); :func:`load_model` rebuilds the algorithm from the JSON and reads the tensors back with
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers.
A ``.d3`` file is loaded only when the caller says it trusts it.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import ConfigError, ModelMismatchError, UnsafeFileError
from .files import atomic_write

if TYPE_CHECKING:
    from d3rlpy.base import LearnableBase

__all__ = ["MODEL_CONFIG", "MODEL_WEIGHTS", "save_model", "save_policy", "load_model"]

MODEL_CONFIG = "model.json"
MODEL_WEIGHTS = "model.pt"
# in a model.pt that holds some modules only (save_policy): which ones; such a model can act,
# not train (its critics and optimisers start afresh)
SAVED_MODULES = "saved_modules"


def save_model(algo: LearnableBase, folder: str | Path) -> Path:
    """Write ``model.json`` and ``model.pt`` into ``folder`` (atomically); returns the folder."""
    weights = io.BytesIO()
    if algo.impl is not None:
        algo.impl.save_model(weights)
    return _save(algo, Path(folder), weights.getvalue())


def save_policy(algo: LearnableBase, folder: str | Path) -> Path:
    """Like :func:`save_model`, with the policy's weights alone: a saved behaviour policy that
    acts exactly as the algorithm did (mean and sampled actions) at a fraction of the size
    (SAC on Hopper: 0.3 of 3 MB); it cannot go on training."""
    if algo.impl is None or not hasattr(algo.impl.modules, "policy"):
        raise ConfigError(f"{type(algo).__name__} has no policy network to save")
    weights = io.BytesIO()
    torch.save(
        {"policy": algo.impl.modules.policy.state_dict(), SAVED_MODULES: ["policy"]}, weights
    )
    return _save(algo, Path(folder), weights.getvalue())


def _save(algo: LearnableBase, folder: Path, weights: bytes) -> Path:
    from d3rlpy.base import LearnableConfigWithShape

    if algo.impl is None:
        raise ConfigError("the algorithm has no networks yet: build or fit it before saving")
    config = LearnableConfigWithShape(
        observation_shape=algo.impl.observation_shape,
        action_size=algo.impl.action_size,
        config=algo.config,
    )
    atomic_write(folder / MODEL_WEIGHTS, lambda f: f.write(weights))
    text = json.dumps(json.loads(config.serialize()), indent=1)
    atomic_write(folder / MODEL_CONFIG, lambda f: f.write(text.encode()))
    return folder


def _files(path: Path) -> tuple[Path, Path]:
    if path.is_dir():
        return path / MODEL_CONFIG, path / MODEL_WEIGHTS
    if path.name.endswith(".json"):
        return path, path.with_suffix(".pt")
    return path.with_suffix(".json"), path


def load_model(
    path: str | Path, device: str = "cpu", *, trust_pickle: bool = False
) -> LearnableBase:
    """An algorithm from a run folder, ``model.json`` or ``model.pt`` (the pair is read), or
    from d3rlpy's pickled ``.d3`` when ``trust_pickle`` is set."""
    import d3rlpy
    from d3rlpy.base import LearnableConfigWithShape

    from .encoders import register  # d3rlpy must know the "lm" type before reading configs

    register()
    path = Path(path)
    if path.suffix == ".d3":
        if not trust_pickle:
            raise UnsafeFileError(
                f"{path}: a .d3 file is a pickle, and loading it runs any code it holds; load "
                f"the run's {MODEL_CONFIG} + {MODEL_WEIGHTS} instead, or pass trust_pickle=True "
                f"(--trust-pickle) for a file you made yourself"
            )
        return d3rlpy.load_learnable(str(path), device=device)
    config_file, weights_file = _files(path)
    for needed in (config_file, weights_file):
        if not needed.is_file():
            raise FileNotFoundError(f"{path}: no {needed.name} at {needed}")
    config = LearnableConfigWithShape.deserialize(config_file.read_text())
    algo = config.create(device)
    try:
        state = torch.load(weights_file, map_location=algo.impl.device, weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = str(exc).strip().splitlines()
        detail = next((line.strip() for line in lines if "Unsupported global" in line), lines[-1])
        raise UnsafeFileError(
            f"{weights_file}: holds more than tensors, so it was not loaded ({detail})"
        ) from None
    load_states(algo, state, weights_file, f" named in {config_file.name}")
    return algo


def module_states(algo: LearnableBase) -> dict[str, Any]:
    """Every module's and optimiser's state dict, by d3rlpy's names (what ``model.pt`` and a
    run's checkpoint hold)."""
    modules = algo.impl.modules.create_checkpointer(algo.impl.device).modules
    return {name: module.state_dict() for name, module in modules.items()}


def load_states(algo: LearnableBase, state: dict[str, Any], source: Path, why: str = "") -> None:
    """Load :func:`module_states` from ``source`` back into a built ``algo`` (or the modules a
    :func:`save_policy` file names); where some are missing, a :class:`ModelMismatchError`
    that names them, ``source`` and ``why``."""
    modules = algo.impl.modules.create_checkpointer(algo.impl.device).modules
    if SAVED_MODULES in state:
        modules = {name: modules[name] for name in state[SAVED_MODULES] if name in modules}
    missing = sorted(set(modules) - set(state))
    if missing:
        raise ModelMismatchError(f"{source}: no state for {missing}{why}")
    for name, module in modules.items():
        module.load_state_dict(state[name])
