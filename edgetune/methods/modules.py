"""Shared plumbing for the methods edgetune implements itself (adapter, llama_adapter, prefix,
adalink): swapping a submodule for a wrapper, the connector switch, and saving exactly the
trainable parameters as safetensors with a JSON config beside them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from edgetune.errors import UserError
from edgetune.families import ModelFamily
from edgetune.families.base import get_module
from edgetune.recipe import MethodSection

WEIGHTS_FILE = "method.safetensors"
CONFIG_FILE = "method.json"


def replace_module(model: torch.nn.Module, dotted: str, new: torch.nn.Module) -> None:
    parent, _, child = dotted.rpartition(".")
    setattr(get_module(model, parent) if parent else model, child, new)


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


def save_trainable(model: torch.nn.Module, out_dir: Path, method: str, config: MethodSection) -> None:
    """Every parameter that requires grad (method + connector), by its name in the model."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}
    save_file(tensors, str(out_dir / WEIGHTS_FILE))
    (out_dir / CONFIG_FILE).write_text(json.dumps({"method": method, "config": config.model_dump(mode="json")}, indent=2))


def load_trainable(model: torch.nn.Module, artifact_dir: Path) -> None:
    """Load what save_trainable wrote into a model that has had the same method attached."""
    path = Path(artifact_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing; the run's artifact is incomplete, re-run `edgetune train`")
    saved = load_file(str(path))
    params = dict(model.named_parameters())
    unknown = sorted(set(saved) - set(params))
    if unknown:
        raise UserError(f"{path}: parameter {unknown[0]} does not exist in this model; was it trained on another one?")
    with torch.no_grad():
        for name, tensor in saved.items():
            if params[name].shape != tensor.shape:
                raise UserError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model expects {tuple(params[name].shape)}")
            params[name].copy_(tensor.to(params[name].dtype))
