"""``edgetune quickstart``: the whole chain, offline, on a tiny model and the built-in task.

OUT/ receives: model/ (the tiny model), data/ (LLaVA-format train/eval JSON + images),
recipe.yaml (paths relative to OUT, so ``edgetune train OUT/recipe.yaml`` re-runs it), run/,
merged/, bundle/ and summary.json. Held-out accuracy is measured before training (frozen 4-bit
backbone), after training (PyTorch, 4-bit + adapter) and on the ONNX bundle (onnxruntime, CPU).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from rich.table import Table

from edgetune.errors import UserError
from edgetune.progress import console


def quickstart_recipe(steps: int, precision: str = "fp32") -> dict[str, Any]:
    """The recipe quickstart writes: NF4 backbone, LoRA on attention + MLP, connector trained."""
    return {
        "model": {"path": "model"},
        "quantization": {"mode": "nf4", "double_quant": True},
        "method": {"name": "lora", "rank": 8, "alpha": 16, "dropout": 0.0, "placement": "both", "train_connector": True},
        "data": {"train": "data/train.json", "eval": "data/eval.json", "max_length": 128},
        "train": {"max_steps": steps, "lr": 3e-3, "batch_size": 8, "warmup_steps": 20, "schedule": "cosine",
                  "gradient_checkpointing": True, "seed": 0, "eval_every": 200, "max_new_tokens": 8},
        "export": {"precision": precision},
    }


@contextlib.contextmanager
def fresh_dir(out: Path) -> Iterator[Path]:
    """Create ``out`` (refusing a non-empty one) and remove it again if the block fails."""
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already exists and is not empty; choose another --out or remove it")
    out.mkdir(parents=True, exist_ok=True)
    try:
        yield out
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise


class Stages:
    """Times each stage and prints it as it finishes."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        console.rule(f"[bold]{name}")
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start
        console.print(f"[dim]{name}: {self.seconds[name]:.1f}s")


def run_quickstart(out: Path, family: str = "llava", steps: int = 800, precision: str = "fp32") -> dict[str, Any]:
    """The chain on ``family``'s tiny model; ``precision`` is bundle/'s (every other precision is
    exported too, from the same trace, into bundles/<precision>/, so the summary compares them)."""
    import torch

    from edgetune.builtin_task import write_task
    from edgetune.data import load_samples
    from edgetune.evaluate import answer_with_torch, evaluate_path, score
    from edgetune.export.bundle import export_bundles
    from edgetune.export.precision import PRECISIONS, precision_options
    from edgetune.families import get_family
    from edgetune.load import load_backbone
    from edgetune.merge import dequantize_then_merge
    from edgetune.recipe import load_recipe
    from edgetune.runtime import OnnxVLM
    from edgetune.runtime.speed import decode_tokens_per_second
    from edgetune.train import train

    chosen = get_family(family)
    targets = {Path(out) / "bundle": precision_options(precision)}  # checked before any work
    targets.update({Path(out) / "bundles" / p: precision_options(p) for p in PRECISIONS if p != precision})
    clock = Stages()
    with fresh_dir(Path(out)) as out:
        with clock.stage("tiny model + built-in task"):
            chosen.build_tiny(out / "model")
            write_task(out / "data")
            (out / "recipe.yaml").write_text(yaml.safe_dump(quickstart_recipe(steps, precision), sort_keys=False))
            recipe = load_recipe(out / "recipe.yaml")
            held_out = load_samples(recipe.data.eval)
        with clock.stage("accuracy before training"):
            frozen = load_backbone(recipe.model, recipe.quantization, torch.device("cpu"), torch.float32)
            before = score(held_out, answer_with_torch(frozen.model, frozen.processor, frozen.family, held_out, 8), "frozen nf4", 0.0)
            del frozen
        with clock.stage("train"):
            result = train(recipe, out / "run")
        with clock.stage("accuracy after training (pytorch)"):
            after_torch = evaluate_path(out / "run", held_out, 8)
        with clock.stage("merge"):
            merge_report = dequantize_then_merge(out / "run", out / "merged")
        with clock.stage("export"):
            manifests = export_bundles(out / "merged", targets, eval_samples=len(held_out))
            manifest = manifests[0]
        with clock.stage("accuracy after export (onnx)"):
            after_onnx = evaluate_path(out / "bundle", held_out, 8)
            decode = decode_tokens_per_second(OnnxVLM.load(out / "bundle"), held_out[0].images[0], held_out[0].question)
        bundle_mb = sum(f.stat().st_size for f in (out / "bundle").rglob("*") if f.is_file()) / 1e6
        precisions = {m["precision"]: m["fidelity"][-1] for m in manifests}
        precisions = {p: {key: precisions[p][key] for key in ("stage", "bundle_mb", "accuracy", "agreement", "kl")}
                      for p in PRECISIONS}
        summary = {
            "family": chosen.name,
            "method": result.method,
            "accuracy_before": before.accuracy,
            "accuracy_after_pytorch": after_torch.accuracy,
            "accuracy_after_onnx": after_onnx.accuracy,
            "held_out_samples": len(held_out),
            "trainable_params": result.trainable_params,
            "total_params": result.total_params,
            "loss_first_to_final": [result.first_loss, result.final_loss],
            "merge_max_logit_diff": merge_report.max_logit_diff,
            "export_parity_max_logit_diff": max(c["max_abs_diff"] for c in manifest["parity"]["checks"]),
            "precision": precision,
            "bundle_mb": bundle_mb,
            "precisions": precisions,
            "decode_tokens_per_s": decode,
            "peak_train_memory_mb": result.peak_memory_mb,
            "stage_seconds": clock.seconds,
            "total_seconds": sum(clock.seconds.values()),
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(summary_table(summary))
    console.print(f"everything is in {out}; re-train with: edgetune train {out / 'recipe.yaml'}")
    return summary


def summary_table(s: dict[str, Any]) -> Table:
    table = Table(title=f"edgetune quickstart: {s['family']} + {s['method']}, {s['held_out_samples']} held-out questions")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("accuracy before training", f"{s['accuracy_before']:.1%}")
    table.add_row("accuracy after (pytorch, nf4 + adapter)", f"{s['accuracy_after_pytorch']:.1%}")
    table.add_row("accuracy after (onnx bundle, cpu)", f"{s['accuracy_after_onnx']:.1%}")
    table.add_row("trainable parameters", f"{s['trainable_params']:,} of {s['total_params']:,}")
    table.add_row("train loss", "{:.3f} -> {:.3f}".format(*s["loss_first_to_final"]))
    table.add_row("merge max |logit diff|", f"{s['merge_max_logit_diff']:.1e}")
    table.add_row("export parity max |logit diff|", f"{s['export_parity_max_logit_diff']:.1e}")
    table.add_row(f"bundle size ({s['precision']})", f"{s['bundle_mb']:.2f} MB")
    for name, row in s["precisions"].items():
        table.add_row(f"{name} bundle: size, held-out accuracy, answers as fp32",
                      f"{row['bundle_mb']:.2f} MB, {row['accuracy']:.1%}, {row['agreement']:.0%}")
    table.add_row("onnx decode speed", f"{s['decode_tokens_per_s']:.0f} tokens/s")
    for name, seconds in s["stage_seconds"].items():
        table.add_row(f"time: {name}", f"{seconds:.1f}s")
    table.add_row("time: total", f"{s['total_seconds']:.1f}s")
    return table
