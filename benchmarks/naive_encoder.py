"""The baseline: a hand-written LM encoder, as one would first write it.

Every encoder that d3rlpy builds loads its own LM as a submodule and encodes every batch it
sees. This is what lmencoders is measured against (LM copies in memory and in checkpoints, LM
passes per update). Do not use it for training: a frozen LM here is still soft-synced by d3rlpy.
"""

from __future__ import annotations

import dataclasses

import torch
import transformers
from d3rlpy.models.encoders import EncoderFactory, register_encoder_factory
from d3rlpy.models.torch import Encoder, EncoderWithAction
from torch import nn

import lmencoders
from lmencoders.backbone import resolve_model_path

CALLS = {"lm_forward": 0}


class _NaiveLM(nn.Module):
    def __init__(self, description: str, hidden: int, extra: int, frozen: bool):
        super().__init__()
        path = resolve_model_path(lmencoders.DEFAULT_MODEL)
        self.description = lmencoders.load_description(description)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        self.lm = transformers.AutoModel.from_pretrained(path)
        self.lm.requires_grad_(not frozen)
        size = self.lm.config.hidden_size + self.description.size + extra
        self.head = nn.Sequential(
            nn.Linear(size, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        CALLS["lm_forward"] += 1
        texts = self.description.format(x.detach().cpu().numpy())
        batch = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        hidden = self.lm(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return (hidden * mask).sum(1) / mask.sum(1)


class NaiveEncoder(Encoder):
    def __init__(self, description: str, frozen: bool):
        super().__init__()
        self.net = _NaiveLM(description, 256, 0, frozen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.head(torch.cat([self.net.features(x), x], dim=1))


class NaiveEncoderWithAction(EncoderWithAction):
    def __init__(self, description: str, action_size: int, frozen: bool):
        super().__init__()
        self.net = _NaiveLM(description, 256, action_size, frozen)

    def forward(self, x: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.net.head(torch.cat([self.net.features(x), x, action], dim=1))


@dataclasses.dataclass()
class NaiveLMEncoderFactory(EncoderFactory):
    description: str = "hopper"
    frozen: bool = True

    def create(self, observation_shape):
        return NaiveEncoder(self.description, self.frozen)

    def create_with_action(self, observation_shape, action_size, discrete_action=False):
        return NaiveEncoderWithAction(self.description, action_size, self.frozen)

    @staticmethod
    def get_type() -> str:
        return "naive_lm"


register_encoder_factory(NaiveLMEncoderFactory)
