"""Bottleneck adapters (Houlsby et al. 2019; parallel form from He et al. 2022), the best method
of the PEFT-for-MLLM study: down-projection to ``bottleneck``, GELU, up-projection initialised to
zero, added as a residual to the output of the LLM's attention and/or MLP blocks.

  sequential:  y = f(x) + up(gelu(down(f(x))))
  parallel:    y = f(x) + up(gelu(down(x)))

The zero up-projection makes step 0 the frozen model. The adapters are nonlinear, so they cannot
be merged into the weights: they stay in the model and are traced into decoder.onnx.
"""

from __future__ import annotations

from typing import Any

import torch

from edgetune.families import ModelFamily
from edgetune.families.base import get_module
from edgetune.methods.modules import MethodModule, OwnMethod, attach_module, chosen_layers, decoder_layers, hidden_states_arg
from edgetune.recipe import MethodSection

CHILD = "adapter"


class Bottleneck(MethodModule):
    def __init__(self, hidden_size: int, bottleneck: int, parallel: bool):
        super().__init__()
        self.parallel = parallel
        self.down = torch.nn.Linear(hidden_size, bottleneck)
        self.up = torch.nn.Linear(bottleneck, hidden_size)
        torch.nn.init.zeros_(self.up.weight)
        torch.nn.init.zeros_(self.up.bias)

    def after(self, host, args, kwargs, output):
        main = output[0] if isinstance(output, tuple) else output  # attention returns (out, weights)
        source = hidden_states_arg(args, kwargs) if self.parallel else main
        delta = self.up(torch.nn.functional.gelu(self.down(source.to(self.down.weight.dtype))))
        result = main + delta.to(main.dtype)
        return (result, *output[1:]) if isinstance(output, tuple) else result


class BottleneckAdapterMethod(OwnMethod):
    name = "adapter"
    options = frozenset({"bottleneck", "placement", "mode", "layers"})
    export_as = "graph"

    def add_modules(self, model: Any, family: ModelFamily, config: MethodSection) -> None:
        hidden = family.text_config(model.config).hidden_size
        blocks = {"attn": [family.attention], "mlp": [family.mlp], "both": [family.attention, family.mlp]}[config.placement]
        layers = decoder_layers(model, family)
        device = next(layers.parameters()).device
        for i in chosen_layers(model, family, config):
            for block in blocks:
                adapter = Bottleneck(hidden, config.bottleneck, parallel=config.mode == "parallel").to(device)
                attach_module(get_module(layers[i], block), CHILD, adapter)
