"""Data-parallel training checked against one process, on whatever this machine has.

On a machine with N GPUs: `edgetune train --num-processes N` (one process per GPU, NCCL) against
one process with the same global batch; without a GPU, N CPU processes with gloo, as
tests/test_distributed.py runs. Both on the tiny LLaVA model and the built-in task with answers of
1 to 9 words (so that the processes hold different numbers of answer tokens), 4-bit base, LoRA.
Ends with one machine-readable line:

    RESULT processes=<N> device=<cuda|cpu> max_loss_diff=<x> max_tensor_diff=<y> same=<true|false>

Usage: python benchmarks/check_ddp.py [--processes N] [--steps 12] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from edgetune.builtin_task import write_task
from edgetune.families import FAMILIES

TOLERANCE = 1e-4  # relative: the same sums in another order


def write_recipe(root: Path, steps: int, batch_size: int, device: str) -> Path:
    model, task = root / "model", root / "task"
    if not model.exists():
        FAMILIES["llava"].build_tiny(model)
        write_task(task / "data", train_count=48, eval_count=16)
        entries = json.loads((task / "data/train.json").read_text())
        for i, entry in enumerate(entries):
            entry["conversations"][1]["value"] = " ".join([entry["conversations"][1]["value"]] * (1 + i * 5 % 9))
        (task / "data/train.json").write_text(json.dumps(entries))
    recipe = {
        "model": {"path": str(model)},
        "method": {"name": "lora", "rank": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(task / "data/train.json"), "max_length": 256},
        "train": {"max_steps": steps, "lr": 3e-3, "batch_size": batch_size, "grad_accum": 2, "warmup_steps": 2,
                  "eval_every": 0, "device": device, "save_every": 0},
    }
    path = root / f"recipe-b{batch_size}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def train(recipe: Path, out: Path, processes: int) -> None:
    command = [sys.executable, "-m", "edgetune", "train", str(recipe), "--out", str(out), "--num-processes", str(processes)]
    subprocess.run(command, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    gpus = torch.cuda.device_count()
    parser.add_argument("--processes", type=int, default=max(2, gpus))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = "cuda" if gpus else "cpu"
    root = args.out or Path(tempfile.mkdtemp(prefix="check-ddp-"))
    root.mkdir(parents=True, exist_ok=True)
    many, one = root / f"run-{args.processes}-processes", root / "run-1-process"
    train(write_recipe(root, args.steps, 2, device), many, args.processes)
    train(write_recipe(root, args.steps, 2 * args.processes, device), one, 1)

    def losses(run: Path) -> torch.Tensor:
        return torch.tensor([r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r])

    loss_diff = float((losses(many) - losses(one)).abs().max())
    ours, theirs = (load_file(run / "adapter/adapter_model.safetensors") for run in (many, one))
    tensor_diff = max(float((ours[k] - theirs[k]).abs().max()) for k in ours)
    scale = max(float(t.abs().max()) for t in theirs.values())
    same = loss_diff <= TOLERANCE * float(losses(one).abs().max()) and tensor_diff <= TOLERANCE * scale
    print(f"RESULT processes={args.processes} device={device} max_loss_diff={loss_diff:.3g} "
          f"max_tensor_diff={tensor_diff:.3g} same={str(same).lower()}")


if __name__ == "__main__":
    main()
