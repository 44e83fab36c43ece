"""The seed study's comparison on the quickstart task: ``edgetune sweep`` over every method, with
the connector tuned and frozen, over several seeds, on the tiny LLaVA and the built-in task (1000
train / 60 held-out images), with the quickstart's recipe (800 steps, batch 8, lr 3e-3).

    python benchmarks/bench_sweep.py [--out DIR] [--seeds 3] [--steps 800]

Writes DIR/sweep.md (the table that goes into BENCHMARKS.md), sweep.json and sweep.png, and prints
the machine it ran on.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import yaml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=800)
    args = parser.parse_args()

    from edgetune.builtin_task import write_task
    from edgetune.families import FAMILIES
    from edgetune.methods import METHODS
    from edgetune.quickstart import quickstart_recipe
    from edgetune.recipe import load_recipe
    from edgetune.sweep import run_sweep

    work = Path(tempfile.mkdtemp(prefix="edgetune-bench-sweep-"))
    FAMILIES["llava"].build_tiny(work / "model")
    write_task(work / "data")
    recipe = quickstart_recipe(args.steps)
    recipe["method"] = {"name": "lora"}  # each method's own defaults, as `edgetune sweep` runs them
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = args.out or work / "sweep"
    start = time.perf_counter()
    run_sweep(load_recipe(work / "recipe.yaml"), sorted(METHODS), args.seeds, [True, False], out)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"total {time.perf_counter() - start:.0f}s; results in {out}")


if __name__ == "__main__":
    main()
