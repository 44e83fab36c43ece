"""LoRA (QLoRA on a 4-bit base) through peft, on the LLM's linears only."""

from __future__ import annotations

from typing import Any

from edgetune.families import ModelFamily
from edgetune.methods.base import PeftLibraryMethod
from edgetune.recipe import MethodSection


class LoraMethod(PeftLibraryMethod):
    name = "lora"
    options = frozenset({"rank", "alpha", "dropout", "placement", "layers"})

    def peft_config(self, model: Any, family: ModelFamily, config: MethodSection) -> Any:
        from peft import LoraConfig

        from edgetune.methods.modules import chosen_layers

        layers = chosen_layers(model, family, config) if config.layers is not None else None
        return LoraConfig(
            r=config.rank,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=family.linear_regex(config.placement, layers),
            modules_to_save=self.connector_to_save(family, config),
            bias="none",
        )
