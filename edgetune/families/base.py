"""What a model family must tell the rest of edgetune.

A family is one transformers vision-language architecture (``config.model_type``). It names
where the three parts live inside the model (vision tower, connector, LLM), which linear layers
PEFT methods may target, and how to turn pixels into the image embeddings that replace the image
placeholder tokens. Loading, training, merging and export are written against this interface
only, so a new family is one file plus one line in ``edgetune.families.FAMILIES``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any


class ModelFamily:
    name: str  # transformers' model_type, e.g. "llava"
    model_class_name: str  # e.g. "LlavaForConditionalGeneration"
    vision_tower: str  # dotted module path inside the model
    connector: str
    language_model: str  # the decoder stack (embeddings, layers, final norm)
    lm_head: str = "lm_head"
    layers: str  # the ModuleList of decoder layers
    attention_linears: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    mlp_linears: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")

    def model_class(self) -> type:
        import transformers

        return getattr(transformers, self.model_class_name)

    def keep_precise(self) -> list[str]:
        """Module names bitsandbytes must not quantize: everything but the LLM's linears."""
        return [self.vision_tower.split(".")[-1], self.connector.split(".")[-1], self.lm_head]

    def num_layers(self, config: Any) -> int:
        return self.text_config(config).num_hidden_layers

    def text_config(self, config: Any) -> Any:
        return config.text_config

    def image_token_id(self, config: Any) -> int:
        return config.image_token_index

    def linear_regex(self, placement: str, layer_ids: list[int] | None = None) -> str:
        """A regex for peft's ``target_modules`` matching the LLM's linears only.

        placement: "attn" (self-attention projections), "mlp" or "both". The vision tower and the
        connector never match, whatever their own layer names are.
        """
        names = {
            "attn": self.attention_linears,
            "mlp": self.mlp_linears,
            "both": self.attention_linears + self.mlp_linears,
        }[placement]
        layers = r"\d+" if layer_ids is None else "(" + "|".join(str(i) for i in layer_ids) + ")"
        return rf"^{re.escape(self.layers)}\.{layers}\.(self_attn|mlp)\.({'|'.join(names)})$"

    def image_features(self, model: Any, pixel_values: Any) -> Any:
        """Pixels -> image embeddings in the LLM's hidden size, shape [num_images, tokens, hidden]."""
        raise NotImplementedError

    def build_tiny(self, out_dir: Path) -> None:
        """Write an offline random-weight model of this family that ``from_pretrained`` loads."""
        raise NotImplementedError


def get_module(model: Any, dotted: str) -> Any:
    module = model
    for part in dotted.split("."):
        module = getattr(module, part)
    return module
