"""``edgetune quickstart --family X`` for every registered family, side by side in one run: held-out
accuracy before training, after (PyTorch, NF4 + LoRA) and after export (ONNX), stage times, bundle
size and ONNX decode speed, on each family's tiny model and the built-in task; and per bundle
precision (fp32, fp16, int8, int4, all exported from one trace) the held-out accuracy, its ratio to
the fp32 bundle's, the answers' agreement with the merged fp32 model and the bundle size.

    python benchmarks/bench_families.py [--out DIR] [--steps 800] [--families llava qwen2_vl ...]

Writes DIR/families.md (the table that goes into BENCHMARKS.md) and DIR/families.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--families", nargs="*", default=None)
    args = parser.parse_args()

    from edgetune.families import FAMILIES
    from edgetune.progress import quiet_libraries
    from edgetune.quickstart import run_quickstart

    quiet_libraries()
    out = args.out or Path(tempfile.mkdtemp(prefix="edgetune-bench-families-"))
    out.mkdir(parents=True, exist_ok=True)
    summaries = {family: run_quickstart(out / family, family=family, steps=args.steps) for family in args.families or sorted(FAMILIES)}
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    rows = [
        "| family | params (trainable) | before | after, PyTorch | after, ONNX | train s | export s | total s | bundle MB | ONNX decode tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for family, s in summaries.items():
        stages = s["stage_seconds"]
        rows.append(
            f"| {family} | {s['total_params']:,} ({s['trainable_params']:,}) | {s['accuracy_before']:.1%} "
            f"| {s['accuracy_after_pytorch']:.1%} | {s['accuracy_after_onnx']:.1%} | {stages['train']:.0f} "
            f"| {stages['export']:.0f} | {s['total_seconds']:.0f} | {s['bundle_mb']:.1f} | {s['decode_tokens_per_s']:.0f} |"
        )
    rows += ["", precision_table(summaries)]
    table = "\n".join(rows)
    header = f"{time.strftime('%Y-%m-%d')}, {machine}, {args.steps} steps, LoRA r8 + connector, batch 8\n\n"
    (out / "families.md").write_text(header + table + "\n")
    (out / "families.json").write_text(json.dumps(summaries, indent=2))
    print(header + table)


def precision_table(summaries: dict) -> str:
    """Held-out accuracy per bundle precision (and relative to fp32), agreement with fp32 answers, size."""
    from edgetune.export.precision import PRECISIONS

    rows = [
        "| family | " + " | ".join(f"{p} acc (rel.)" for p in PRECISIONS) + " | int4 agreement | "
        + " | ".join(f"{p} MB" for p in PRECISIONS) + " |",
        "|---|" + "---|" * (2 * len(PRECISIONS) + 1),
    ]
    for family, s in summaries.items():
        bundles = s["precisions"]
        fp32 = bundles["fp32"]["accuracy"] or 1e-9
        accuracy = " | ".join(f"{bundles[p]['accuracy']:.1%} ({bundles[p]['accuracy'] / fp32:.1%})" for p in PRECISIONS)
        sizes = " | ".join(f"{bundles[p]['bundle_mb']:.2f}" for p in PRECISIONS)
        rows.append(f"| {family} | {accuracy} | {bundles['int4']['agreement']:.0%} | {sizes} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
