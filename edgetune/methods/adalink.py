"""AdaLink (Wang et al. 2023): non-intrusive PEFT. Two low-rank residual adapters on what goes
into the frozen LLM, one for text tokens, one for image tokens; nothing inside the LLM changes.

  text:   e' = e + U_t D_t e   on every token embedding (a hook on the embedding table)
  image:  v' = v + U_v D_v v   on every image embedding (a hook on the connector's last linear)

U is initialised to zero, so step 0 is the frozen model. Both fold exactly into weights the model
already has, so an AdaLink bundle costs nothing at run time: the text adapter acts per token, so
the table becomes E' = E + E D_t^T U_t^T; the image adapter follows the connector's last linear
y = W x + b, so (I + U_v D_v) y is the linear W' = W + U_v D_v W, b' = b + U_v D_v b.
"""

from __future__ import annotations

from typing import Any

import torch

from edgetune.errors import UserError
from edgetune.families import ModelFamily
from edgetune.families.base import get_module
from edgetune.methods.modules import MethodModule, OwnMethod, attach_module, detach_module
from edgetune.recipe import MethodSection

CHILD = "adalink"


class LowRankResidual(MethodModule):
    """x -> x + up(down(x)), bias-free so that it folds into a linear map exactly."""

    def __init__(self, hidden_size: int, rank: int):
        super().__init__()
        self.down = torch.nn.Linear(hidden_size, rank, bias=False)
        self.up = torch.nn.Linear(rank, hidden_size, bias=False)
        torch.nn.init.zeros_(self.up.weight)

    def after(self, host, args, kwargs, output):
        return output + self.up(self.down(output.to(self.down.weight.dtype))).to(output.dtype)

    def matrix(self) -> torch.Tensor:
        """U D, [hidden, hidden], in fp32."""
        return self.up.weight.float() @ self.down.weight.float()


class AdaLinkMethod(OwnMethod):
    name = "adalink"
    options = frozenset({"rank"})
    export_as = "merged"

    def check_family(self, family: ModelFamily, config: MethodSection) -> None:
        if family.connector_output is None:
            raise UserError(
                f"method 'adalink' cannot be exported for '{family.name}' models: their connector does not end "
                "in a linear layer that the image adapter could be folded into; choose another method"
            )

    def add_modules(self, model: Any, family: ModelFamily, config: MethodSection) -> None:
        hidden = family.text_config(model.config).hidden_size
        for host in (model.get_input_embeddings(), get_module(model, family.connector_output)):
            attach_module(host, CHILD, LowRankResidual(hidden, config.rank).to(host.weight.device))

    def merge(self, model: Any, family: ModelFamily) -> Any:
        with torch.no_grad():
            embed = model.get_input_embeddings()
            lm_head = model.get_output_embeddings()
            if lm_head is not None and lm_head.weight is embed.weight:
                # A tied LM head would change with the table: keep the output side as trained.
                lm_head.weight = torch.nn.Parameter(embed.weight.detach().clone())
                model.config.get_text_config().tie_word_embeddings = False
                model.config.tie_word_embeddings = False
            text = detach_module(embed, CHILD).matrix()
            embed.weight.copy_((embed.weight.float() + embed.weight.float() @ text.T).to(embed.weight.dtype))
            linear = get_module(model, family.connector_output)
            image = detach_module(linear, CHILD).matrix()
            linear.weight.copy_((linear.weight.float() + image @ linear.weight.float()).to(linear.weight.dtype))
            if linear.bias is not None:
                linear.bias.copy_((linear.bias.float() + image @ linear.bias.float()).to(linear.bias.dtype))
        return model
