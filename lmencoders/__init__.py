"""lmencoders: read offline-RL observations as text through a pre-trained language model.

``import lmencoders`` registers :class:`LMEncoderFactory` with d3rlpy (type ``"lm"``), so
``d3rlpy.load_learnable`` can rebuild algorithms that use it (without the import, d3rlpy fails
with ``KeyError: 'lm'``), and NeoRL's FinRL task with gymnasium (``lmencoders/FinRL-v0``).
"""

import contextlib
import io

# d3rlpy imports the old ``gym`` package, which prints a notice to upgrade to gymnasium on
# import; lmencoders already uses gymnasium, so the notice would only mislead our users.
with contextlib.redirect_stderr(io.StringIO()):
    import gym  # noqa: F401

from .algos import LMDecisionTransformer, LMDecisionTransformerConfig
from .backbone import DEFAULT_MODEL, TUNING_MODES
from .datasets import load_dataset
from .description import StateDescription, load_description, shipped_descriptions
from .encoders import LMEncoderFactory, register
from .envs import register_environments
from .errors import (
    DescriptionError,
    LMEncodersError,
    ModelMismatchError,
    ModelNotFoundError,
    ObservationError,
    TextTooLongError,
    UnreachableTokenError,
)
from .features import embed_observations, precompute_features
from .relabel import RelabelConfig, relabel
from .sampling import flat_sampling
from .saving import load_model, save_model

register()
register_environments()

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "TUNING_MODES",
    "LMEncoderFactory",
    "StateDescription",
    "load_description",
    "shipped_descriptions",
    "embed_observations",
    "LMEncodersError",
    "DescriptionError",
    "ObservationError",
    "TextTooLongError",
    "ModelNotFoundError",
    "ModelMismatchError",
    "UnreachableTokenError",
    "precompute_features",
    "load_dataset",
    "flat_sampling",
    "save_model",
    "load_model",
    "RelabelConfig",
    "relabel",
    "LMDecisionTransformerConfig",
    "LMDecisionTransformer",
]
