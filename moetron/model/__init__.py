"""moetron.model: the plain single-device transformer, its config, and parameter/FLOP accounting."""

from moetron.model.config import ModelConfig, RopeScaling, list_presets
from moetron.model.transformer import ModelOutput, Transformer

__all__ = ["ModelConfig", "ModelOutput", "RopeScaling", "Transformer", "list_presets"]
