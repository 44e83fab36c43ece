"""``edgetune sweep``: the seed study's comparison on the user's own data.

Every (method, connector on/off, seed) combination trains from the same recipe with the same data
and step budget; each run's held-out accuracy is measured in PyTorch, and the first seed of each
(method, connector) pair is also merged, exported and measured with the ONNX bundle. Results:
OUT/sweep.md (markdown table), OUT/sweep.json (every run), OUT/sweep.png (accuracy chart) and the
runs themselves under OUT/runs/.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgetune.errors import UserError
from edgetune.progress import console
from edgetune.recipe import Recipe


@dataclass
class SweepRun:
    method: str
    connector: bool
    seed: int
    accuracy: float
    onnx_accuracy: float | None
    trainable_params: int
    peak_memory_mb: float
    train_seconds: float
    final_loss: float


def parse_connector(value: str) -> list[bool]:
    choices = {"on": True, "off": False}
    parts = [p.strip() for p in value.split(",") if p.strip()]
    if not parts or any(p not in choices for p in parts):
        raise UserError(f"--connector {value!r}: expected on, off or on,off")
    return [choices[p] for p in parts]


def method_recipe(recipe: Recipe, method: str, connector: bool, seed: int) -> Recipe:
    """The base recipe with another method: the base's method options that apply to it carry over."""
    from edgetune.methods import METHODS

    base = recipe.method.model_dump(exclude_unset=True)
    options = {k: v for k, v in base.items() if k in METHODS[method].options}
    section = recipe.method.model_validate({**options, "name": method, "train_connector": connector})
    return recipe.model_copy(update={"method": section, "train": recipe.train.model_copy(update={"seed": seed})})


def run_sweep(recipe: Recipe, methods: list[str], seeds: int, connectors: list[bool], out: Path) -> list[SweepRun]:
    from edgetune.data import load_samples
    from edgetune.evaluate import evaluate_path
    from edgetune.export import export_bundle
    from edgetune.merge import dequantize_then_merge
    from edgetune.methods import METHODS, get_method
    from edgetune.train import train

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UserError(f"--methods: unknown method '{unknown[0]}'; known: {', '.join(sorted(METHODS))}")
    if recipe.data.eval is None:
        raise UserError("data.eval: a sweep compares held-out accuracy; set data.eval in the recipe")
    if seeds < 1:
        raise UserError("--seeds must be at least 1")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already exists and is not empty; choose another --out or remove it")
    for method in methods:  # every problem before the first run, not after an hour of training
        config = method_recipe(recipe, method, True, 0).method
        get_method(config).check_family(_family(recipe), config)
    held_out = load_samples(recipe.data.eval)
    runs: list[SweepRun] = []
    total = len(methods) * len(connectors) * seeds
    for method in methods:
        for connector in connectors:
            for seed in range(seeds):
                name = f"{method}-connector_{'on' if connector else 'off'}-seed{seed}"
                console.rule(f"[bold]{len(runs) + 1}/{total}: {name}")
                run_dir = out / "runs" / name
                result = train(method_recipe(recipe, method, connector, seed), run_dir)
                accuracy = evaluate_path(run_dir, held_out, recipe.train.max_new_tokens).accuracy
                onnx_accuracy = None
                if seed == 0:
                    dequantize_then_merge(run_dir, out / "merged" / name)
                    # The sweep measures the bundle's accuracy itself (below): no held-out questions in export.
                    export_bundle(out / "merged" / name, out / "bundles" / name, recipe.export.precision, eval_samples=0)
                    onnx_accuracy = evaluate_path(out / "bundles" / name, held_out, recipe.train.max_new_tokens).accuracy
                runs.append(SweepRun(method, connector, seed, accuracy, onnx_accuracy, result.trainable_params,
                                     result.peak_memory_mb, result.train_seconds, result.final_loss))
                console.print(f"{name}: held-out accuracy {accuracy:.1%}")
                (out / "sweep.json").write_text(json.dumps([asdict(r) for r in runs], indent=2))
    rows = summarize(runs)
    (out / "sweep.md").write_text(markdown_table(rows, recipe, seeds))
    plot(rows, out / "sweep.png")
    console.print(markdown_table(rows, recipe, seeds))
    return runs


def _family(recipe: Recipe):
    from edgetune.load import detect_family

    return detect_family(recipe.model)[0]


def summarize(runs: list[SweepRun]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, bool], list[SweepRun]] = {}
    for run in runs:
        groups.setdefault((run.method, run.connector), []).append(run)
    rows = []
    for (method, connector), group in groups.items():
        accuracies = [r.accuracy for r in group]
        rows.append({
            "method": method,
            "connector": connector,
            "accuracy_mean": statistics.mean(accuracies),
            "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "seed0_accuracy": next(r.accuracy for r in group if r.onnx_accuracy is not None),
            "onnx_accuracy": next(r.onnx_accuracy for r in group if r.onnx_accuracy is not None),
            "trainable_params": group[0].trainable_params,
            "peak_memory_mb": max(r.peak_memory_mb for r in group),
            "train_seconds": statistics.mean(r.train_seconds for r in group),
        })
    return sorted(rows, key=lambda r: -r["accuracy_mean"])


def markdown_table(rows: list[dict[str, Any]], recipe: Recipe, seeds: int) -> str:
    lines = [
        f"Held-out accuracy on {recipe.data.eval.name}, {recipe.train.max_steps} steps, mean ± std over {seeds} seed(s); "
        "seed 0: that run's accuracy in PyTorch (4-bit backbone + method) and after merge + ONNX export (onnxruntime).",
        "",
        "| method | connector | held-out accuracy | seed 0: PyTorch → ONNX | trainable params | peak memory (MB) | train time (s) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {'tuned' if r['connector'] else 'frozen'} | {r['accuracy_mean']:.1%} ± {r['accuracy_std']:.1%} "
            f"| {r['seed0_accuracy']:.1%} → {r['onnx_accuracy']:.1%} | {r['trainable_params']:,} | {r['peak_memory_mb']:.0f} | {r['train_seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['method']}\n{'conn. tuned' if r['connector'] else 'conn. frozen'}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(rows)), 3.8))
    ax.bar(range(len(rows)), [r["accuracy_mean"] for r in rows], yerr=[r["accuracy_std"] for r in rows], capsize=4,
           color=["tab:blue" if r["connector"] else "tab:gray" for r in rows])
    ax.scatter(range(len(rows)), [r["onnx_accuracy"] for r in rows], color="black", marker="x", zorder=3, label="ONNX (seed 0)")
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
