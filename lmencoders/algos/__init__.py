"""d3rlpy algorithms built on lmencoders' language models (registered with d3rlpy on import)."""

from .lm_decision_transformer import LMDecisionTransformer, LMDecisionTransformerConfig

__all__ = ["LMDecisionTransformer", "LMDecisionTransformerConfig"]
