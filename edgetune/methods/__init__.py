"""The PEFT-method registry: ``method.name`` in a recipe -> PeftMethod."""

from __future__ import annotations

from edgetune.errors import UserError
from edgetune.methods.adalink import AdaLinkMethod
from edgetune.methods.adapter import BottleneckAdapterMethod
from edgetune.methods.base import PeftMethod
from edgetune.methods.ia3 import IA3Method
from edgetune.methods.llama_adapter import LlamaAdapterMethod
from edgetune.methods.lora import LoraMethod
from edgetune.methods.prefix import PrefixTuningMethod
from edgetune.recipe import MethodSection

METHODS: dict[str, PeftMethod] = {
    "lora": LoraMethod(),
    "adapter": BottleneckAdapterMethod(),
    "llama_adapter": LlamaAdapterMethod(),
    "ia3": IA3Method(),
    "prefix": PrefixTuningMethod(),
    "adalink": AdaLinkMethod(),
}

COMMON_OPTIONS = frozenset({"name", "train_connector"})


def get_method(config: MethodSection, source: str = "recipe") -> PeftMethod:
    """The registry entry for ``config.name``, after checking every key set applies to it."""
    if config.name not in METHODS:
        raise UserError(f"{source}: method.name: unknown method '{config.name}'; known: {', '.join(sorted(METHODS))}")
    method = METHODS[config.name]
    stray = sorted(config.model_fields_set - COMMON_OPTIONS - method.options)
    if stray:
        raise UserError(
            f"{source}: method.{stray[0]} does not apply to method '{method.name}'; "
            f"its options: {', '.join(sorted(method.options | COMMON_OPTIONS))}"
        )
    return method
