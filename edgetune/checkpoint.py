"""Training checkpoints: everything a run needs to continue, bit for bit, after a crash.

A checkpoint is a directory ``RUN/checkpoints/step-000120/`` holding
  trainable.safetensors  the method's trainable parameters, by ``model.named_parameters()`` name
  optimizer.safetensors  the optimizer's state tensors, keyed ``<parameter index>.<name>``
  rng.safetensors        each process's torch generator states: ``<rank>.cpu``, ``<rank>.cuda.<device>``
  state.json             the step, the scheduler's state, the optimizer's parameter groups and
                         non-tensor state, each process's Python ``random`` state, and the
                         loop's running totals (global micro-batches drawn, tokens, seconds,
                         peak memory, losses, processes)
It is written under a scratch name, synced, and renamed into place, so a directory named
``step-N`` is always whole, whenever the process dies; the newest ``keep`` are kept. Only
safetensors and JSON: resuming unpickles nothing.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from edgetune.errors import UserError

CHECKPOINTS = "checkpoints"
FORMAT = 1


@dataclass
class Checkpoint:
    path: Path
    step: int
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # torch.optim.Optimizer.state_dict() layout
    schedule: dict[str, Any]  # LRScheduler.state_dict()
    rng: list[dict[str, Any]]  # capture_rng() of each process, by rank
    loop: dict[str, Any]  # the loop's running totals


def capture_rng() -> dict[str, Any]:
    """Every generator a training step draws from (dropout, Python's random), as tensors and JSON."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if state.get("cuda"):
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    schedule: Any, rng: list[dict[str, Any]], loop: dict[str, Any], keep: int) -> Path:
    """Write the checkpoint of ``step`` atomically; remove all but the newest ``keep``. Returns its path.

    ``rng`` is each process's capture_rng() taken when the state after ``step`` was current (the
    loop passes the one it took before the next step drew anything), ``loop`` any JSON-able totals."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(exist_ok=True)
    final = root / f"step-{step:06d}"
    scratch = root / f".{final.name}.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    trainable = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, scratch / "trainable.safetensors")
    tensors, optimizer_json = _split_optimizer_state(optimizer.state_dict())
    save_file(tensors, scratch / "optimizer.safetensors")
    rng_tensors = {}
    for rank, generators in enumerate(rng):
        rng_tensors[f"{rank}.cpu"] = generators["cpu"]
        rng_tensors |= {f"{rank}.cuda.{i}": s for i, s in enumerate(generators.get("cuda", []))}
    save_file(rng_tensors, scratch / "rng.safetensors")
    python_random = [[version, list(internal), gauss] for version, internal, gauss in (r["python"] for r in rng)]
    state = {"format": FORMAT, "step": step, "optimizer": optimizer_json, "schedule": schedule.state_dict(),
             "python_random": python_random, "loop": loop}
    (scratch / "state.json").write_text(json.dumps(state))
    for file in scratch.iterdir():
        _fsync(file)
    if final.exists():
        shutil.rmtree(final)
    scratch.rename(final)
    _fsync(root)
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's whole checkpoints, oldest first (a scratch ``.step-N.partial`` is never one)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step-") and (p / "state.json").is_file())


def load_latest_checkpoint(run_dir: Path, clean: bool = True) -> Checkpoint | None:
    """The newest whole checkpoint of ``run_dir`` (None if there is none); with ``clean``, scratch
    leftovers of a crash are removed (the main process's job)."""
    root = Path(run_dir) / CHECKPOINTS
    if clean and root.is_dir():
        for leftover in root.glob(".step-*.partial"):
            shutil.rmtree(leftover, ignore_errors=True)
    found = complete_checkpoints(run_dir)
    if not found:
        return None
    path = found[-1]
    try:
        state = json.loads((path / "state.json").read_text())
        if state.get("format") != FORMAT:
            raise UserError(f"{path}: checkpoint format {state.get('format')} is not {FORMAT}; resume it with the edgetune that wrote it")
        trainable = load_file(path / "trainable.safetensors")
        optimizer = _join_optimizer_state(load_file(path / "optimizer.safetensors"), state["optimizer"])
        rng_tensors = load_file(path / "rng.safetensors")
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{path}: damaged checkpoint ({err}); delete this folder to resume from the one before it") from None
    rng = []
    for rank, python_random in enumerate(state["python_random"]):
        cuda = [rng_tensors[f"{rank}.cuda.{i}"] for i in range(sum(k.startswith(f"{rank}.cuda.") for k in rng_tensors))]
        rng.append({"cpu": rng_tensors[f"{rank}.cpu"], "python": python_random, "cuda": cuda})
    return Checkpoint(path, state["step"], trainable, optimizer, state["schedule"], rng, state["loop"])


def restore_trainable(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Copy a checkpoint's trainable tensors into ``model``'s trainable parameters, in place."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if params.keys() != tensors.keys():
        missing = sorted(params.keys() - tensors.keys()) or sorted(tensors.keys() - params.keys())
        raise UserError(f"{where}: the checkpoint's trainable tensors do not match the model's (first: {missing[0]}); "
                        "was the recipe's method or model changed?")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name])


def _split_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for index, entry in state_dict["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], saved: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = tensor
    for index, scalars in saved["scalars"].items():
        state.setdefault(int(index), {}).update(scalars)
    return {"state": state, "param_groups": saved["param_groups"]}


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file or a directory's entries) to the disk, so that a power cut after the
    rename cannot leave a complete-looking checkpoint with empty files."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
