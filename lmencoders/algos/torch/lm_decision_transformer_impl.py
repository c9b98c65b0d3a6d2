"""The maths of the LM Decision Transformer: a pretrained LM body reading (return-to-go,
state, action) tokens, with Reid et al.'s alignment loss and LaMo's language loss.

The body is lmencoders' shared one (:func:`lmencoders.backbone.language_model`): this module
owns only the LM tensors its tuning mode trains and runs the body through
``torch.func.functional_call``, so a frozen or LoRA model's checkpoint holds no copy of the
body, exactly as for :class:`lmencoders.LMEncoderFactory`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from d3rlpy.algos.transformer.base import TransformerAlgoImplBase
from d3rlpy.algos.transformer.inputs import TorchTransformerInput
from d3rlpy.models.torch import Encoder
from d3rlpy.optimizers import OptimizerWrapper
from d3rlpy.torch_utility import Modules, TorchTrajectoryMiniBatch
from d3rlpy.types import Shape
from torch import nn

from ...alignment import annealed_weight, cosine_alignment_loss
from ...backbone import (
    Frozen,
    LanguageModel,
    TuningMode,
    by_body_name,
    check_weights_digest,
    language_model,
    real_token_positions,
    trainable_copies,
    weights_digest,
)
from ...language_loss import TextCorpus

__all__ = [
    "LanguageBody",
    "PretrainedDecisionTransformer",
    "LMDecisionTransformerModules",
    "LMDecisionTransformerImpl",
    "LanguageLossSettings",
    "causal_mask",
]


class LanguageBody(nn.Module):
    """The shared pretrained body, fed input embeddings and read causally.

    Holds only what its tuning mode trains. The word-embedding matrix is left out in every
    mode: inputs arrive as embeddings, so it is never read (and would dominate a checkpoint).
    With ``pretrained=False`` the same architecture starts from random weights (the baseline
    that tells what pretraining adds); that body is trained whole and is the module's own."""

    def __init__(self, model: str, tuning: TuningMode, pretrained: bool = True) -> None:
        super().__init__()
        self.model_name, self.tuning, self.pretrained = model, tuning, pretrained
        lm = language_model(model, tuning if pretrained else Frozen())
        self.hidden_size = lm.hidden_size
        self.max_positions = int(getattr(lm.model.config, "max_position_embeddings", 0) or 0)
        self.random_body: nn.Module | None = None
        names: list[str] = []
        if pretrained:
            self.register_buffer("lm_weights_sha256", weights_digest(lm))
            names = [n for n in tuning.trainable_names(lm.model) if n != lm.input_embedding_name]
        else:
            import transformers

            self.random_body = transformers.AutoModel.from_config(lm.model.config).float()
        self.lm_parameters = trainable_copies(lm.named_tensors(names))

    def body(self, device: torch.device) -> LanguageModel:
        return language_model(self.model_name, self.tuning, device)

    def _run(self, inputs: dict[str, Any]) -> Any:
        if self.random_body is not None:
            return self.random_body(**inputs)
        lm = self.body(inputs["inputs_embeds"].device)
        parameters = by_body_name(self.lm_parameters)
        if parameters:
            return torch.func.functional_call(lm.model, parameters, args=(), kwargs=inputs)
        return lm.model(**inputs)

    @staticmethod
    def _inputs(embeddings: torch.Tensor, keep: torch.Tensor) -> dict[str, Any]:
        return {
            "inputs_embeds": embeddings,
            "attention_mask": causal_mask(keep, embeddings.dtype),
            "position_ids": real_token_positions(keep),
        }

    def forward(self, embeddings: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Last hidden states ``(B, L, H)`` of ``embeddings`` ``(B, L, H)`` read causally;
        ``keep`` (B, L) marks real tokens. Positions count real tokens only, so a window
        padded at the front reads as the same window unpadded."""
        return self._run(self._inputs(embeddings, keep)).last_hidden_state

    def _model(self, device: torch.device) -> nn.Module:
        """The Hugging Face model that runs: the random body, or the shared pretrained one."""
        return self.random_body if self.random_body is not None else self.body(device).model

    def word_embeddings(self, device: torch.device) -> torch.Tensor:
        """The ``(V, H)`` word-embedding matrix: the pretrained body's (frozen, never in a
        checkpoint) or the random body's own."""
        return self._model(device).get_input_embeddings().weight

    def language_loss(self, ids: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of the body, as tuned, on token ids ``(B, L + 1)``,
        its head tied to the word embeddings (LaMo's regulariser)."""
        words = self.word_embeddings(ids.device)
        inputs = ids[:, :-1]
        keep = torch.ones_like(inputs)
        hidden = self._run(self._inputs(words[inputs], keep)).last_hidden_state
        logits = hidden @ words.T
        return nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())

    @torch.no_grad()
    def attentions(self, embeddings: torch.Tensor, keep: torch.Tensor) -> list[torch.Tensor]:
        """Attention probabilities ``(B, heads, L, L)`` of every layer (eager attention for
        the call: fused kernels do not return them)."""
        model = self._model(embeddings.device)
        previous = model.config._attn_implementation
        model.set_attn_implementation("eager")
        try:
            return list(
                self._run({**self._inputs(embeddings, keep), "output_attentions": True}).attentions
            )
        finally:
            model.set_attn_implementation(previous)

    def _load_from_state_dict(
        self, state_dict: dict[str, torch.Tensor], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        if self.pretrained:
            saved = state_dict.get(prefix + "lm_weights_sha256")
            check_weights_digest(saved, self.lm_weights_sha256, self.model_name)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def causal_mask(keep: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive ``(B, 1, L, L)`` mask: 0 where a token may look (itself and the earlier tokens
    that ``keep`` (B, L) marks real), the dtype's minimum elsewhere. Additive, not boolean:
    Hugging Face's eager attention reads a boolean 4-D mask as numbers. Seeing itself keeps
    padded rows finite (their outputs are never used)."""
    length = keep.shape[1]
    lower = torch.tril(torch.ones(length, length, dtype=torch.bool, device=keep.device))
    eye = torch.eye(length, dtype=torch.bool, device=keep.device)
    allowed = ((lower & keep.bool()[:, None, :]) | eye)[:, None]
    blocked = torch.zeros(allowed.shape, dtype=dtype, device=keep.device)
    return blocked.masked_fill(~allowed, torch.finfo(dtype).min)


def _projection(in_size: int, out_size: int, kind: str) -> nn.Module:
    if kind == "mlp":  # LaMo's MLP embeddings
        return nn.Sequential(nn.Linear(in_size, out_size), nn.GELU(), nn.Linear(out_size, out_size))
    return nn.Linear(in_size, out_size)


class PretrainedDecisionTransformer(nn.Module):
    """Decision Transformer whose sequence model is a pretrained LM: (R, s, a) tokens through
    projections (and, with ``timestep_embedding``, DT's learned timestep embedding) and a
    LayerNorm into the LM, actions from the state tokens' outputs."""

    def __init__(
        self,
        encoder: Encoder,
        encoder_size: int,
        body: LanguageBody,
        action_size: int,
        *,
        projection: str,
        max_timestep: int,
        timestep_embedding: bool,
        embed_dropout: float,
    ) -> None:
        super().__init__()
        hidden = body.hidden_size
        self.encoder = encoder
        self.body = body
        self.state_projection = _projection(encoder_size, hidden, projection)
        self.action_projection = _projection(action_size, hidden, projection)
        self.return_projection = _projection(1, hidden, projection)
        self.timestep = nn.Embedding(max_timestep + 1, hidden) if timestep_embedding else None
        self.embed_norm = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(embed_dropout)
        self.head = nn.Linear(hidden, action_size)

    def forward(
        self,
        x: torch.Tensor,
        action: torch.Tensor,
        return_to_go: torch.Tensor,
        timesteps: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Actions ``(B, T, A)`` predicted at every state token; ``attention_mask`` (B, T) is
        1 for real steps (d3rlpy pads windows at the front)."""
        return self.actions_and_tokens(x, action, return_to_go, timesteps, attention_mask)[0]

    def actions_and_tokens(
        self,
        x: torch.Tensor,
        action: torch.Tensor,
        return_to_go: torch.Tensor,
        timesteps: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`forward`'s actions, with the token embeddings the body read and which of
        them are real (what the alignment loss needs)."""
        h, keep = self.tokens(x, action, return_to_go, timesteps, attention_mask)
        if not self.training:  # acting: the last action is the one being predicted
            h, keep = h[:, :-1], keep[:, :-1]
        out = self.body(self.dropout(h), keep)
        return torch.tanh(self.head(out[:, 1::3])), h, keep

    def tokens(
        self,
        x: torch.Tensor,
        action: torch.Tensor,
        return_to_go: torch.Tensor,
        timesteps: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalised token embeddings ``(B, 3T, H)`` (R_1, s_1, a_1, R_2...) and which
        of them are real ``(B, 3T)``."""
        batch, steps, _ = return_to_go.shape
        states = self.encoder(x.reshape(batch * steps, *x.shape[2:])).reshape(batch, steps, -1)
        tokens = [
            self.return_projection(return_to_go),
            self.state_projection(states),
            self.action_projection(action),
        ]
        if self.timestep is not None:
            position = self.timestep(timesteps.long().clamp_max(self.timestep.num_embeddings - 1))
            tokens = [t + position for t in tokens]
        # (B, T, 3, H) -> (B, 3T, H): R_1, s_1, a_1, R_2, ...
        h = torch.stack(tokens, dim=2).reshape(batch, 3 * steps, -1)
        return self.embed_norm(h), attention_mask.repeat_interleave(3, dim=1)


@dataclasses.dataclass(frozen=True)
class LanguageLossSettings:
    """LaMo's language loss: ``weight`` x the next-token cross-entropy on ``batch_size``
    windows of ``length`` tokens from the text file ``corpus``."""

    weight: float
    corpus: str
    batch_size: int
    length: int


@dataclasses.dataclass(frozen=True)
class LMDecisionTransformerModules(Modules):
    transformer: PretrainedDecisionTransformer
    optim: OptimizerWrapper


class LMDecisionTransformerImpl(TransformerAlgoImplBase):
    """Loss: squared action error on real steps, plus the annealed alignment loss and the
    language loss where they are on."""

    _modules: LMDecisionTransformerModules

    def __init__(
        self,
        observation_shape: Shape,
        action_size: int,
        modules: LMDecisionTransformerModules,
        device: str,
        *,
        centroids: torch.Tensor | None,
        cos_weight: float,
        cos_anneal_steps: int,
        language: LanguageLossSettings | None = None,
    ) -> None:
        super().__init__(observation_shape, action_size, modules, device)
        self._centroids = None if centroids is None else centroids.to(device)
        self._cos_weight = cos_weight
        self._cos_anneal_steps = cos_anneal_steps
        self._language = language
        self._corpus: TextCorpus | None = None  # read at the first update: loading needs none

    def _language_loss(self) -> torch.Tensor:
        settings = self._language
        assert settings is not None
        body = self._modules.transformer.body
        if self._corpus is None:
            tokenizer = body.body(torch.device("cpu")).tokenizer
            self._corpus = TextCorpus(settings.corpus, tokenizer, settings.length)
        return body.language_loss(self._corpus.sample(settings.batch_size, self.device))

    def inner_predict(self, inpt: TorchTransformerInput) -> torch.Tensor:
        action = self._modules.transformer(
            inpt.observations, inpt.actions, inpt.returns_to_go, inpt.timesteps, inpt.masks
        )
        return action[0][-1]

    def losses(self, batch: TorchTrajectoryMiniBatch, grad_step: int) -> dict[str, torch.Tensor]:
        action, tokens, keep = self._modules.transformer.actions_and_tokens(
            batch.observations, batch.actions, batch.returns_to_go, batch.timesteps, batch.masks
        )
        error = ((action - batch.actions) ** 2).sum(dim=-1)
        losses = {"action_loss": (error.reshape(-1) * batch.masks.reshape(-1)).mean()}
        weight = annealed_weight(self._cos_weight, grad_step, self._cos_anneal_steps)
        if self._centroids is not None and weight > 0.0:
            cos = cosine_alignment_loss(tokens, self._centroids, keep)
            losses["cos_loss"] = cos
            losses["loss"] = losses["action_loss"] + weight * cos
        else:
            losses["loss"] = losses["action_loss"]
        if self._language is not None:
            losses["language_loss"] = self._language_loss()
            losses["loss"] = losses["loss"] + self._language.weight * losses["language_loss"]
        return losses

    def inner_update(self, batch: TorchTrajectoryMiniBatch, grad_step: int) -> dict[str, float]:
        self._modules.optim.zero_grad()
        losses = self.losses(batch, grad_step)
        losses["loss"].backward()
        self._modules.optim.step()
        return {k: float(v.detach().cpu()) for k, v in losses.items()}
