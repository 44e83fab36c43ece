"""LoRA (QLoRA on a 4-bit base) through peft, on the LLM's linears only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgetune.families import ModelFamily
from edgetune.methods.base import PeftMethod
from edgetune.recipe import MethodSection


class LoraMethod(PeftMethod):
    name = "lora"
    options = frozenset({"rank", "alpha", "dropout", "placement", "layers"})

    def attach(self, model: Any, family: ModelFamily, config: MethodSection) -> Any:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=config.rank,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=family.linear_regex(config.placement, config.layers),
            modules_to_save=[family.connector.split(".")[-1]] if config.train_connector else None,
            bias="none",
        )
        return get_peft_model(model, lora)

    def save(self, model: Any, out_dir: Path) -> None:
        model.save_pretrained(out_dir, safe_serialization=True)

    def load(self, model: Any, family: ModelFamily, config: MethodSection, artifact_dir: Path) -> Any:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, artifact_dir)

    def merge(self, model: Any, family: ModelFamily) -> Any:
        return model.merge_and_unload()
