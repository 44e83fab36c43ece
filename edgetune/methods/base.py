"""What a PEFT method must provide: attach to a frozen backbone, save/load its artifact, and say
how it reaches the ONNX bundle.

A method is one file plus one line in ``edgetune.methods.METHODS``. ``options`` lists the
``method.*`` recipe keys it reads besides ``name`` and ``train_connector``; any other key set in a
recipe is an error naming it.

``export_as`` is the method's path to the device:
  "merged"     folded into the full-precision weights; the bundle is a plain model (lora, ia3, adalink)
  "graph"      its modules stay in the model and are traced into decoder.onnx (adapter, llama_adapter)
  "kv_prefix"  a constant key/value prefix that the runtime puts in the KV cache first (prefix)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgetune.families import ModelFamily
from edgetune.recipe import MethodSection

EXPORT_KINDS = ("merged", "graph", "kv_prefix")


class PeftMethod:
    name: str
    options: frozenset[str] = frozenset()
    export_as: str = "merged"
    identity_at_init: bool = True  # at step 0 the adapted model equals the frozen model

    def check_family(self, family: ModelFamily, config: MethodSection) -> None:
        """Raise UserError, before any training, if this method cannot train or export on ``family``."""

    def attach(self, model: Any, family: ModelFamily, config: MethodSection) -> Any:
        """Wrap the frozen model; only the method's parameters (and the connector if
        ``config.train_connector``) require grad afterwards."""
        raise NotImplementedError

    def save(self, model: Any, out_dir: Path) -> None:
        """Write the trained artifact (safetensors + JSON) to out_dir."""
        raise NotImplementedError

    def load(self, model: Any, family: ModelFamily, config: MethodSection, artifact_dir: Path) -> Any:
        """Re-attach a saved artifact to a freshly loaded backbone; outputs equal the trained model's."""
        raise NotImplementedError

    def merge(self, model: Any, family: ModelFamily) -> Any:
        """export_as == "merged": fold the method into the (dequantized, full-precision) weights and
        return a plain transformers model with identical outputs."""
        raise NotImplementedError(f"method '{self.name}' is exported as '{self.export_as}', not merged")

    def kv_prefix(self, model: Any, family: ModelFamily) -> list[tuple[Any, Any]]:
        """export_as == "kv_prefix": per layer (key, value), each [kv_heads, prefix_len, head_dim],
        exactly as the attention layers see them in front of the cache."""
        raise NotImplementedError(f"method '{self.name}' has no KV prefix")


class PeftLibraryMethod(PeftMethod):
    """A method peft implements (lora, ia3): ``peft_config`` picks the modules, peft does the rest.
    The artifact is peft's own format (adapter_config.json + adapter_model.safetensors)."""

    def peft_config(self, model: Any, family: ModelFamily, config: MethodSection) -> Any:
        raise NotImplementedError

    def attach(self, model: Any, family: ModelFamily, config: MethodSection) -> Any:
        from peft import get_peft_model

        return get_peft_model(model, self.peft_config(model, family, config))

    def save(self, model: Any, out_dir: Path) -> None:
        model.save_pretrained(out_dir, safe_serialization=True)

    def load(self, model: Any, family: ModelFamily, config: MethodSection, artifact_dir: Path) -> Any:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, artifact_dir)

    def merge(self, model: Any, family: ModelFamily) -> Any:
        from peft.utils import ModulesToSaveWrapper

        # The trained connector copy goes back in place first: peft 0.21's IA3 unload would treat
        # its wrapper as a linear layer and fail (LoRA's unload handles it, but needs no help).
        for name, module in list(model.named_modules()):
            if isinstance(module, ModulesToSaveWrapper):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, module.modules_to_save[module.active_adapters[0]])
        return model.merge_and_unload()

    @staticmethod
    def connector_to_save(family: ModelFamily, config: MethodSection) -> list[str] | None:
        """peft's modules_to_save: the connector trains fully (and is saved) when train_connector is on."""
        return [family.connector.split(".")[-1]] if config.train_connector else None
