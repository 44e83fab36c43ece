"""Shared plumbing for the methods edgetune implements itself (adapter, llama_adapter, prefix,
adalink).

Such a method never rewrites the frozen model: it adds a small ``MethodModule`` as a child of a
frozen module (``layers.3.self_attn.adapter``) and registers a forward hook (or pre-hook) on that
module which calls it. The frozen model's own code, module paths and parameter names stay as
transformers wrote them, so gradient checkpointing, ``generate`` and the ONNX exporter (which
traces hooks like any other Python) see the model they know, and the method's parameters are
exactly the ones whose names contain its child's name.

The artifact is every parameter that requires grad (the method's, plus the connector's when it is
trained), saved by name as safetensors, with a JSON file naming the method beside it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from edgetune.errors import UserError
from edgetune.families import ModelFamily
from edgetune.families.base import get_module
from edgetune.methods.base import PeftMethod
from edgetune.recipe import MethodSection

WEIGHTS_FILE = "method.safetensors"
CONFIG_FILE = "method.json"


class MethodModule(torch.nn.Module):
    """A method's trainable part, attached to one frozen module and called by a hook on it.

    Subclasses implement ``before`` (a forward pre-hook: may rewrite the host's arguments) and/or
    ``after`` (a forward hook: may rewrite its output). ``enabled = False`` turns the hook into a
    no-op, which is how export traces the frozen model alone (see ``methods_disabled``).
    """

    enabled = True
    # A [batch, hidden] tensor the module needs on every decoder step that only the vision side
    # produces (the image's mean embedding): exported as a decoder.onnx input of this name, set on
    # the module as ``feature`` before each step (edgetune.export.graphs.DecoderGraph).
    decoder_input: str | None = None

    def before(self, host: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        return None

    def after(self, host: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        return None

    def _pre_hook(self, host, args, kwargs):
        return self.before(host, args, kwargs) if self.enabled else None

    def _post_hook(self, host, args, kwargs, output):
        return self.after(host, args, kwargs, output) if self.enabled else None


def attach_module(host: torch.nn.Module, name: str, module: MethodModule) -> MethodModule:
    """Make ``module`` the child ``host.<name>`` and hook it into host's forward."""
    if hasattr(host, name):
        raise ValueError(f"{type(host).__name__} already has a child called {name!r}")
    host.add_module(name, module)
    handles = []
    if type(module).before is not MethodModule.before:
        handles.append(host.register_forward_pre_hook(module._pre_hook, with_kwargs=True))
    if type(module).after is not MethodModule.after:
        handles.append(host.register_forward_hook(module._post_hook, with_kwargs=True))
    module._handles = handles  # a plain attribute: handles are not state
    return module


def detach_module(host: torch.nn.Module, name: str) -> MethodModule:
    """Undo attach_module: remove the hooks and the child; return the child."""
    module = getattr(host, name)
    for handle in module._handles:
        handle.remove()
    delattr(host, name)
    return module


@contextlib.contextmanager
def methods_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` as the frozen model it was before any MethodModule was attached."""
    modules = [m for m in model.modules() if isinstance(m, MethodModule)]
    for module in modules:
        module.enabled = False
    try:
        yield
    finally:
        for module in modules:
            module.enabled = True


def hidden_states_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    """The first input of a decoder submodule, whether passed by position or as hidden_states=."""
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def decoder_layers(model: Any, family: ModelFamily) -> torch.nn.ModuleList:
    return get_module(model, family.layers)


def chosen_layers(model: Any, family: ModelFamily, config: MethodSection, default: list[int] | None = None) -> list[int]:
    """config.layers if set (validated against the model), else ``default``, else every layer."""
    count = len(decoder_layers(model, family))
    layers = config.layers if config.layers is not None else (default if default is not None else list(range(count)))
    bad = [i for i in layers if not 0 <= i < count]
    if bad or not layers:
        raise UserError(f"method.layers: {config.layers} must name LLM layers 0..{count - 1} (this model has {count})")
    return sorted(set(layers))


def set_connector_trainable(model: Any, family: ModelFamily, config: MethodSection) -> None:
    for param in get_module(model, family.connector).parameters():
        param.requires_grad_(config.train_connector)


class OwnMethod(PeftMethod):
    """A method edgetune implements with MethodModules: the connector switch, then ``add_modules``;
    the artifact is the trainable parameters by name (method.safetensors + method.json)."""

    def add_modules(self, model: Any, family: ModelFamily, config: MethodSection) -> None:
        raise NotImplementedError

    def attach(self, model: Any, family: ModelFamily, config: MethodSection) -> Any:
        set_connector_trainable(model, family, config)  # first: the method's own modules stay trainable
        self.add_modules(model, family, config)
        return model

    def save(self, model: Any, out_dir: Path) -> None:
        save_trainable(model, out_dir, self.name)

    def load(self, model: Any, family: ModelFamily, config: MethodSection, artifact_dir: Path) -> Any:
        model = self.attach(model, family, config)
        load_trainable(model, artifact_dir)
        return model


def save_trainable(model: torch.nn.Module, out_dir: Path, method: str) -> None:
    """Every parameter that requires grad (method + connector), by its name in the model."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"method": method})
    shapes = {name: list(t.shape) for name, t in tensors.items()}
    (out_dir / CONFIG_FILE).write_text(json.dumps({"method": method, "parameters": shapes}, indent=2))


def load_trainable(model: torch.nn.Module, artifact_dir: Path) -> None:
    """Load what save_trainable wrote into a model that has had the same method attached; the
    saved names must be exactly the model's trainable parameters."""
    path = Path(artifact_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing; the run's artifact is incomplete, re-run `edgetune train`")
    saved = load_file(str(path))
    params = dict(model.named_parameters())
    expected = {name for name, p in params.items() if p.requires_grad}
    unknown, missing = sorted(set(saved) - expected), sorted(expected - set(saved))
    if unknown or missing:
        name = (unknown or missing)[0]
        problem = "is not a trainable parameter of this model" if unknown else "is missing from the artifact"
        raise UserError(f"{path}: {name} {problem}; was it trained with another model or method options?")
    with torch.no_grad():
        for name, tensor in saved.items():
            if params[name].shape != tensor.shape:
                raise UserError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model expects {tuple(params[name].shape)}")
            params[name].copy_(tensor.to(params[name].dtype))
