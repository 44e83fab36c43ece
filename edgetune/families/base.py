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
    attention: str = "self_attn"  # inside a decoder layer
    mlp: str = "mlp"
    attention_linears: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    mlp_linears: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    key_value_linears: tuple[str, ...] = ("k_proj", "v_proj")  # IA3 rescales their outputs
    mlp_output_linear: str = "down_proj"  # IA3 rescales its input: the MLP's inner activations
    connector_output: str | None = None  # the connector's last nn.Linear (AdaLink folds into it)
    rope: str = "1d"  # "1d": the attention module's apply_rotary_pos_emb(q, k, cos, sin)

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
        return self.module_regex(names, layer_ids)

    def module_regex(self, names: tuple[str, ...], layer_ids: list[int] | None = None) -> str:
        """A regex matching the LLM's submodules called ``names`` (in attention or MLP) in ``layer_ids``."""
        layers = r"\d+" if layer_ids is None else "(" + "|".join(str(i) for i in layer_ids) + ")"
        parts = f"({re.escape(self.attention)}|{re.escape(self.mlp)})"
        return rf"^{re.escape(self.layers)}\.{layers}\.{parts}\.({'|'.join(names)})$"

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
