"""Decision Transformer on a pretrained language model (Reid, Yamada and Gu 2022; LaMo, Shi et
al. 2024) as a d3rlpy algorithm: ``fit``, evaluators, loggers, saving and loading as d3rlpy's
own Decision Transformer.

    import d3rlpy, lmencoders
    dt = lmencoders.LMDecisionTransformerConfig(tuning="lora", context_size=20).create()
    dt.fit(dataset, n_steps=10_000)
    actor = dt.as_stateful_wrapper(target_return=3600)

d3rlpy's ``DecisionTransformer`` builds a fresh GPT-2-style stack; this one runs any Hugging
Face model the rest of lmencoders runs (encoder models such as the shipped MiniLM get a causal
mask), tuned through lmencoders' tuning modes: ``full`` (Reid et al.), ``lora`` (LaMo),
``ln_embed`` (LayerNorms) or ``frozen``. Reid et al.'s alignment loss L_cos pulls the input
tokens towards K-means centroids of the LM's word embeddings (``cos_weight``, ``cos_clusters``,
annealed over ``cos_anneal_steps``). LaMo's language loss keeps a causal LM predicting text
while it learns control (``language_weight``, ``language_corpus``).

State tokens come from ``encoder_factory``: by default the observation itself (a plain
linear ``projection`` into the LM, as Reid et al.), or lmencoders' language features of the
described observation with ``LMEncoderFactory(...)`` (the Decision Transformer reading the
state as text).
"""

from __future__ import annotations

import dataclasses

import torch
from d3rlpy.algos.transformer.base import TransformerAlgoBase, TransformerConfig
from d3rlpy.base import DeviceArg, register_learnable
from d3rlpy.constants import ActionSpace
from d3rlpy.models import EncoderFactory, VectorEncoderFactory, make_encoder_field
from d3rlpy.optimizers import AdamWFactory, OptimizerFactory, make_optimizer_field
from d3rlpy.optimizers.lr_schedulers import WarmupSchedulerFactory
from d3rlpy.types import Shape

from ..alignment import language_centroids
from ..backbone import DEFAULT_MODEL, TUNING_MODES, make_tuning
from ..checks import non_negative, positive
from ..errors import ConfigError
from ..language_loss import check_language_head
from .torch.lm_decision_transformer_impl import (
    LanguageBody,
    LanguageLossSettings,
    LMDecisionTransformerImpl,
    LMDecisionTransformerModules,
    PretrainedDecisionTransformer,
)

__all__ = ["LMDecisionTransformerConfig", "LMDecisionTransformer"]

PROJECTIONS = ("linear", "mlp")


def _reid_optimizer() -> AdamWFactory:
    """Reid et al.'s optimiser: AdamW, weight decay 1e-4, gradients clipped at 0.25, linear
    warm-up over 10k steps."""
    return AdamWFactory(
        weight_decay=1e-4,
        clip_grad_norm=0.25,
        lr_scheduler_factory=WarmupSchedulerFactory(warmup_steps=10_000),
    )


def _observation_itself() -> VectorEncoderFactory:
    return VectorEncoderFactory(hidden_units=[])  # no layers: the projection reads the state


@dataclasses.dataclass()
class LMDecisionTransformerConfig(TransformerConfig):
    """Config of the LM Decision Transformer (d3rlpy's ``TransformerConfig`` fields too:
    ``context_size``, ``max_timestep``, scalers).

    Args:
        model: Hugging Face name or local directory (default: the shipped MiniLM).
        pretrained: ``False``: the same architecture from random weights (tuning ``full``),
            the baseline that tells what the pretrained weights add.
        tuning: ``full``, ``lora``, ``ln_embed`` or ``frozen`` (what of the LM trains).
        lora_rank, lora_alpha: LoRA settings (LaMo: 16, 32).
        projection: ``linear`` (Reid et al.) or ``mlp`` (LaMo) input projections.
        timestep_embedding: add DT's learned timestep embedding to every token (the LM's own
            position embeddings are always there: they are part of the pretrained model).
        cos_weight: weight of the alignment loss L_cos (0: off).
        cos_clusters: K of the K-means reduction of the LM's word embeddings.
        cos_anneal_steps: the weight falls along a sigmoid to ~0 by this step (0: constant).
        embed_dropout: dropout on the token embeddings.
        language_weight: weight of LaMo's language loss, the next-token cross-entropy of the
            body on ``language_corpus`` (0: off; LaMo: 0.1 on WikiText-103). Needs a causal
            LM whose head is tied to its word embeddings (GPT-2, SmolLM2), not MiniLM.
        language_corpus: a UTF-8 text file, read at the first update (loading needs none).
        language_batch_size, language_length: windows per update and tokens per window.
        encoder_factory: where state tokens come from (default: the observation itself).
        optim_factory: default AdamW as Reid et al. (lr warm-up, clipping, weight decay).
    """

    batch_size: int = 64
    learning_rate: float = 1e-4
    model: str = DEFAULT_MODEL
    pretrained: bool = True
    tuning: str = "full"
    lora_rank: int = 16
    lora_alpha: int = 32
    projection: str = "linear"
    timestep_embedding: bool = True
    cos_weight: float = 0.1
    cos_clusters: int = 1000
    cos_anneal_steps: int = 5000
    embed_dropout: float = 0.1
    language_weight: float = 0.0
    language_corpus: str | None = None
    language_batch_size: int = 4
    language_length: int = 64
    encoder_factory: EncoderFactory = dataclasses.field(
        metadata=make_encoder_field().metadata, default_factory=_observation_itself
    )
    optim_factory: OptimizerFactory = dataclasses.field(
        metadata=make_optimizer_field().metadata, default_factory=_reid_optimizer
    )

    def __post_init__(self) -> None:
        if self.tuning not in TUNING_MODES:
            raise ConfigError(
                f"unknown tuning {self.tuning!r}; choose one of {sorted(TUNING_MODES)}"
            )
        if not self.pretrained and self.tuning != "full":
            raise ConfigError(
                f"a randomly initialised body trains whole: tuning must be 'full', got "
                f"{self.tuning!r}"
            )
        if self.projection not in PROJECTIONS:
            raise ConfigError(f"projection must be one of {PROJECTIONS}, got {self.projection!r}")
        for name in ("batch_size", "context_size", "max_timestep", "cos_clusters"):
            setattr(self, name, positive(getattr(self, name), name))
        self.cos_anneal_steps = non_negative(self.cos_anneal_steps, "cos_anneal_steps")
        if self.cos_weight < 0:
            raise ConfigError(f"cos_weight must be >= 0, got {self.cos_weight}")
        for name in ("language_batch_size", "language_length"):
            setattr(self, name, positive(getattr(self, name), name))
        if self.language_weight < 0:
            raise ConfigError(f"language_weight must be >= 0, got {self.language_weight}")
        if self.language_weight > 0 and not self.language_corpus:
            raise ConfigError(
                "language_weight > 0 needs language_corpus, a UTF-8 text file to predict "
                "(LaMo uses WikiText-103)"
            )
        if not 0.0 <= self.embed_dropout < 1.0:
            raise ConfigError(f"embed_dropout must be in [0, 1), got {self.embed_dropout}")

    def create(self, device: DeviceArg = False, enable_ddp: bool = False) -> LMDecisionTransformer:
        return LMDecisionTransformer(self, device, enable_ddp)

    @staticmethod
    def get_type() -> str:
        return "lm_decision_transformer"


class LMDecisionTransformer(
    TransformerAlgoBase[LMDecisionTransformerImpl, LMDecisionTransformerConfig]
):
    def inner_create_impl(self, observation_shape: Shape, action_size: int) -> None:
        config = self._config
        tuning = make_tuning(config.tuning, rank=config.lora_rank, alpha=config.lora_alpha)
        body = LanguageBody(config.model, tuning, pretrained=config.pretrained)
        tokens = 3 * config.context_size
        if body.max_positions and tokens > body.max_positions:
            raise ConfigError(
                f"context_size {config.context_size} makes {tokens} tokens; {config.model!r} "
                f"has {body.max_positions} positions (context_size <= {body.max_positions // 3})"
            )
        language = None
        if config.language_weight > 0:
            check_language_head(body.body(torch.device("cpu")).model.config, config.model)
            if body.max_positions and config.language_length > body.max_positions:
                raise ConfigError(
                    f"language_length {config.language_length} is longer than {config.model!r}'s "
                    f"{body.max_positions} positions"
                )
            assert config.language_corpus is not None  # checked by the config
            language = LanguageLossSettings(
                config.language_weight,
                config.language_corpus,
                config.language_batch_size,
                config.language_length,
            )
        encoder = config.encoder_factory.create(observation_shape)
        with torch.no_grad():  # the encoder's output size, probed on CPU as d3rlpy does
            encoder_size = int(encoder(torch.rand(2, *observation_shape)).shape[-1])
        transformer = PretrainedDecisionTransformer(
            encoder,
            encoder_size,
            body,
            action_size,
            projection=config.projection,
            max_timestep=config.max_timestep,
            timestep_embedding=config.timestep_embedding,
            embed_dropout=config.embed_dropout,
        ).to(self._device)
        optim = config.optim_factory.create(
            transformer.named_modules(), lr=config.learning_rate, compiled=False
        )
        centroids = (
            language_centroids(body.body(torch.device("cpu")), config.cos_clusters)
            if config.cos_weight > 0
            else None
        )
        self._impl = LMDecisionTransformerImpl(
            observation_shape,
            action_size,
            LMDecisionTransformerModules(transformer=transformer, optim=optim),
            self._device,
            centroids=centroids,
            cos_weight=config.cos_weight,
            cos_anneal_steps=config.cos_anneal_steps,
            language=language,
        )

    def get_action_type(self) -> ActionSpace:
        return ActionSpace.CONTINUOUS


register_learnable(LMDecisionTransformerConfig)
