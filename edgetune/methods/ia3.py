"""IA3 through peft: learned vectors that rescale the keys, the values and the MLP's inner
activations (the input of its down-projection). Initialised to ones, so step 0 is the frozen
model; merged into the dequantized weights as row (k, v) or column (down) scaling."""

from __future__ import annotations

from typing import Any

from edgetune.families import ModelFamily
from edgetune.methods.base import PeftLibraryMethod
from edgetune.recipe import MethodSection


class IA3Method(PeftLibraryMethod):
    name = "ia3"
    options = frozenset({"placement", "layers"})

    def peft_config(self, model: Any, family: ModelFamily, config: MethodSection) -> Any:
        from peft import IA3Config

        from edgetune.methods.modules import chosen_layers

        layers = chosen_layers(model, family, config) if config.layers is not None else None
        feedforward = (family.mlp_output_linear,)
        names = {"attn": family.key_value_linears, "mlp": feedforward, "both": family.key_value_linears + feedforward}
        return IA3Config(
            target_modules=family.module_regex(names[config.placement], layers),
            feedforward_modules=family.module_regex(feedforward, layers),
            modules_to_save=self.connector_to_save(family, config),
        )
