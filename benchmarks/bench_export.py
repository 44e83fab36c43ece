"""Export (and merge) cost at real model shapes: wall time, peak memory and bundle size.

For each shape (a benchmarks/configs/ name; default smolvlm-256m and qwen2-vl-2b) it builds the
random-weight model directory (benchmarks/real_shapes.py; or reuses --model-dir), then runs
``edgetune export MODEL_DIR --out B --precision P --overwrite`` as a subprocess per precision
(fp32 always; fp16/int8/int4 when ``edgetune export --help`` offers them). For each run:

- wall time; peak RSS and peak anonymous memory (RssAnon) of the child's process tree, sampled from
  /proc every 0.2 s by a thread here, and VmHWM (the kernel's own peak RSS) read by the child at exit;
- the ratio of those peaks to the model's fp32 size (4 bytes x parameters, read from the
  safetensors headers). RSS counts the memory-mapped safetensors pages the model may still sit
  on; those are file-backed and reclaimable, so anonymous memory is what the machine must have;
- the bundle's files and total size in MB, and whether any file exceeds 2 GB (protobuf's limit
  for a single .onnx; weights beyond it must live in external data files);
- a stage timeline (``--stages``, on by default): a sitecustomize put on the child's PYTHONPATH
  starts a thread inside it that records, every 0.2 s, its RSS / anonymous memory and the edgetune
  functions on the main thread's stack (plus the library below them), so each stage's peak shows.

``--merge`` measures ``edgetune merge`` instead: a run directory is trained for one step (the
built-in task, 8 images, LoRA r8, small max_length, one tile / few pixels per image) on the same
shape, then merged. ``--max-gb`` kills a child whose tree grows past it (recorded as such), so a
run cannot take the shared machine down.

    python benchmarks/bench_export.py [smolvlm-256m qwen2-vl-2b ...] [--work DIR] [--model-dir DIR]
        [--precisions fp32,fp16,int8,int4] [--merge] [--max-gb 14] [--edgetune-src DIR]

Prints a markdown table per shape and ends with one line ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import real_shapes  # noqa: E402  (benchmarks/ is not a package)

GB = 1e9
TWO_GB = 2**31  # protobuf's ceiling for one serialized message
PRECISIONS = ("fp32", "fp16", "int8", "int4")
STATUS_FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")
SOURCE_TREE = ""  # --edgetune-src

# Runs inside the child (edgetune itself, unchanged) when EDGETUNE_BENCH_TIMELINE names a file.
SITECUSTOMIZE = r'''
import os, sys, threading, time, json, atexit

def _edgetune_bench_timeline(path, period=0.2):
    main = threading.main_thread()
    out = open(path, "w", buffering=1)
    started = time.time()

    def status():
        values = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                    values[key] = int(rest.split()[0]) * 1024
        return values

    def stage():
        frame = sys._current_frames().get(main.ident)
        stack = []
        while frame is not None:
            stack.append(frame)
            frame = frame.f_back
        stack.reverse()  # outermost first
        ours = [i for i, f in enumerate(stack) if f.f_globals.get("__name__", "").startswith("edgetune")]
        if not ours:
            return "", ""
        chain = [stack[i].f_code.co_name for i in ours if stack[i].f_code.co_name not in ("<module>", "main", "wrapper")]
        if chain and chain[-1] == stack[ours[-1]].f_code.co_name:
            chain[-1] += f":{stack[ours[-1]].f_lineno}"  # the line within the innermost edgetune function
        below = stack[ours[-1] + 1] if ours[-1] + 1 < len(stack) else None
        lib = ".".join(below.f_globals.get("__name__", "").split(".")[:2]) if below is not None else ""
        return ">".join(chain[-3:]), lib

    def loop():
        while True:
            try:
                name, lib = stage()
                out.write(json.dumps({"t": round(time.time() - started, 2), "stage": name, "lib": lib, **status()}) + "\n")
            except Exception:
                pass
            time.sleep(period)

    def at_exit():
        out.write(json.dumps({"t": round(time.time() - started, 2), "stage": "exit", "lib": "", **status()}) + "\n")
        out.close()

    threading.Thread(target=loop, daemon=True, name="edgetune-bench-timeline").start()
    atexit.register(at_exit)

if os.environ.get("EDGETUNE_BENCH_TIMELINE"):
    _edgetune_bench_timeline(os.environ.pop("EDGETUNE_BENCH_TIMELINE"))
'''


# ---- measuring a child process tree ----------------------------------------------------------------


def read_status(pid: int) -> dict[str, int]:
    values = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                key, _, rest = line.partition(":")
                if key in STATUS_FIELDS:
                    values[key] = int(rest.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return values


def process_tree(root: int) -> list[int]:
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as children:
                    todo += [int(child) for child in children.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return pids


class TreeSampler(threading.Thread):
    """Samples the summed VmRSS / RssAnon / RssFile of a process tree; kills it past ``limit`` bytes."""

    def __init__(self, pid: int, period: float = 0.2, limit: float | None = None):
        super().__init__(daemon=True)
        self.pid, self.period, self.limit = pid, period, limit
        self.peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
        self.samples = 0
        self.killed_at: int | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            totals = {key: 0 for key in self.peak}
            for pid in process_tree(self.pid):
                status = read_status(pid)
                for key in totals:
                    totals[key] += status.get(key, 0)
            if totals["VmRSS"]:
                self.samples += 1
                for key, value in totals.items():
                    self.peak[key] = max(self.peak[key], value)
                if self.limit and totals["VmRSS"] > self.limit and self.killed_at is None:
                    self.killed_at = totals["VmRSS"]
                    try:
                        os.killpg(self.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            self.stop.wait(self.period)


def run_measured(command: list[str], log: Path, limit_gb: float | None, stages: bool) -> dict:
    """Run ``command`` in its own process group with the tree sampler (and the in-child stage
    timeline); returns wall time, exit code, peaks in bytes and the timeline's rows."""
    env = dict(os.environ)
    if SOURCE_TREE:  # another checkout's edgetune, imported ahead of the installed one
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [SOURCE_TREE, env.get("PYTHONPATH")]))
    timeline = log.with_suffix(".timeline.jsonl")
    site_dir = None
    if stages:
        site_dir = tempfile.mkdtemp(prefix="edgetune-bench-site-")
        (Path(site_dir) / "sitecustomize.py").write_text(SITECUSTOMIZE)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [site_dir, env.get("PYTHONPATH")]))
        env["EDGETUNE_BENCH_TIMELINE"] = str(timeline)
    started = time.perf_counter()
    with open(log, "w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        sampler = TreeSampler(child.pid, limit=limit_gb * GB if limit_gb else None)
        sampler.start()
        _, wait_status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(wait_status)
    wall = time.perf_counter() - started
    sampler.stop.set()
    sampler.join()
    if sampler.killed_at and "--out" in command:  # SIGKILL skips atomic_output_dir's cleanup
        out = Path(command[command.index("--out") + 1])
        for partial in out.parent.glob(f".{out.name}.partial-*"):
            shutil.rmtree(partial, ignore_errors=True)
    if site_dir:
        shutil.rmtree(site_dir, ignore_errors=True)
    rows = [json.loads(line) for line in timeline.read_text().splitlines() if line.strip()] if timeline.is_file() else []
    exit_row = next((row for row in reversed(rows) if row.get("stage") == "exit"), {})
    return {
        "command": " ".join(command),
        "rc": child.returncode,
        "wall_s": round(wall, 1),
        "peak_rss": sampler.peak["VmRSS"],
        "peak_anon": sampler.peak["RssAnon"],
        "peak_file": sampler.peak["RssFile"],
        "vm_hwm": exit_row.get("VmHWM") or usage.ru_maxrss * 1024,  # at exit; ru_maxrss if the child died
        "samples": sampler.samples,
        "killed_at": sampler.killed_at,
        "log": str(log),
        "timeline": rows,
    }


def stage_table(rows: list[dict], min_s: float = 2.0) -> list[dict]:
    """The timeline as contiguous segments of one stage (the same edgetune functions on the stack),
    in order: start, seconds, peak RSS and anonymous memory, the library below edgetune. Segments
    shorter than ``min_s`` are folded into the one before, unless they raise the peak so far."""
    segments: list[dict] = []
    peak = 0
    for row in rows:
        name = row.get("stage") or "(startup)"
        if name == "exit":
            continue
        rss, anon = row.get("VmRSS", 0), row.get("RssAnon", 0)
        if not segments or segments[-1]["stage"] != name:
            segments.append({"stage": name, "first_s": row["t"], "last_s": row["t"], "peak_rss": 0, "peak_anon": 0, "libs": {}})
        segment = segments[-1]
        segment["last_s"] = row["t"]
        segment["peak_rss"], segment["peak_anon"] = max(segment["peak_rss"], rss), max(segment["peak_anon"], anon)
        if row.get("lib"):
            segment["libs"][row["lib"]] = segment["libs"].get(row["lib"], 0) + 1
    kept: list[dict] = []
    for segment in segments:
        raises_peak = segment["peak_rss"] > peak
        peak = max(peak, segment["peak_rss"])
        if kept and segment["last_s"] - segment["first_s"] < min_s and not raises_peak:
            kept[-1]["last_s"] = segment["last_s"]
            kept[-1]["peak_anon"] = max(kept[-1]["peak_anon"], segment["peak_anon"])
            kept[-1]["peak_rss"] = max(kept[-1]["peak_rss"], segment["peak_rss"])
            continue
        kept.append(segment)
    for i, segment in enumerate(kept):
        end = kept[i + 1]["first_s"] if i + 1 < len(kept) else segment["last_s"]
        segment["s"] = round(end - segment["first_s"], 1)
        segment["libs"] = [lib for lib, _ in sorted(segment["libs"].items(), key=lambda kv: -kv[1])[:2]]
        del segment["last_s"]
    return kept


# ---- model, bundle and CLI facts -------------------------------------------------------------------


def model_parameters(model_dir: Path) -> int:
    """Parameters stored in the directory's safetensors files, read from their headers only."""
    total = 0
    for path in Path(model_dir).glob("*.safetensors"):
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, entry in header.items():
            if name != "__metadata__":
                count = 1
                for dim in entry["shape"]:
                    count *= dim
                total += count
    return total


def bundle_files(bundle: Path) -> dict[str, int]:
    return {str(p.relative_to(bundle)): p.stat().st_size for p in sorted(bundle.rglob("*")) if p.is_file()}


def offered_precisions(help_text: str) -> tuple[set[str], bool]:
    """The --precision values ``edgetune export --help`` names, and whether --vision-precision exists."""
    flat = " ".join(help_text.split())
    match = re.search(r"--precision\b(.*?)(?=--[a-z])", flat)
    named = set(re.findall(r"\b(fp32|fp16|int8|int4)\b", match.group(1))) if match else set()
    return named | {"fp32"}, "--vision-precision" in flat


def export_help() -> str:
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1", TERM="dumb")
    if SOURCE_TREE:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [SOURCE_TREE, env.get("PYTHONPATH")]))
    return subprocess.run(["edgetune", "export", "--help"], capture_output=True, text=True, env=env).stdout


def manifest_facts(bundle: Path) -> dict:
    manifest_file = bundle / "manifest.json"
    if not manifest_file.is_file():
        return {}
    manifest = json.loads(manifest_file.read_text())
    facts = {"precision": manifest.get("precision")}
    if "fidelity" in manifest:
        facts["fidelity"] = manifest["fidelity"]
    parity = manifest.get("parity", {}).get("checks")
    if parity:
        facts["max_abs_diff"] = max(check["max_abs_diff"] for check in parity)
    return facts


def tail(path: Path, lines: int = 5) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


# ---- the two modes ---------------------------------------------------------------------------------


def export_runs(model_dir: Path, work: Path, precisions: list[str], args: argparse.Namespace, fp32_bytes: int) -> list[dict]:
    offered, vision_option = offered_precisions(export_help())
    runs = []
    for precision in precisions:
        if precision not in offered:
            runs.append({"precision": precision, "status": "not offered by `edgetune export --help`"})
            continue
        bundle = work / f"bundle-{precision}"
        command = ["edgetune", "export", str(model_dir), "--out", str(bundle), "--precision", precision, "--overwrite"]
        print(f"[bench] {' '.join(command)}", file=sys.stderr, flush=True)
        run = run_measured(command, work / f"export-{precision}.log", args.max_gb, args.stages)
        run.update(precision=precision, vision_precision_option=vision_option)
        run["status"] = "ok" if run["rc"] == 0 else ("killed above --max-gb" if run["killed_at"] else f"exit {run['rc']}")
        if run["rc"] == 0:
            files = bundle_files(bundle)
            run["files"] = {name: round(size / 1e6, 1) for name, size in files.items()}
            run["bundle_mb"] = round(sum(files.values()) / 1e6, 1)
            run["largest_file_mb"] = round(max(files.values()) / 1e6, 1)
            run["over_2gb"] = [name for name, size in files.items() if size > TWO_GB]
            run.update(manifest_facts(bundle))
            if not args.keep_bundles:
                shutil.rmtree(bundle, ignore_errors=True)
        else:
            run["error_tail"] = tail(run["log"])
        add_ratios(run, fp32_bytes)
        runs.append(run)
        print(f"[bench] {precision}: {summary_line(run)}", file=sys.stderr, flush=True)
    return runs


def merge_runs(shape: str, model_dir: Path, work: Path, args: argparse.Namespace, fp32_bytes: int) -> list[dict]:
    """Train one LoRA step on the shape, then measure `edgetune merge` of that run."""
    import yaml

    from edgetune.builtin_task import write_task

    family = real_shapes.load_spec(shape)["family"] if shape else json.loads((model_dir / "config.json").read_text())["model_type"]
    write_task(work / "data", train_count=8, eval_count=4)
    knobs = {"idefics3": {"do_image_splitting": False}, "smolvlm": {"do_image_splitting": False},
             "qwen2_vl": {"max_pixels": 56 * 56}, "qwen2_5_vl": {"max_pixels": 56 * 56}}.get(family, {})
    recipe = {
        "model": {"path": str(model_dir), **({"processor": knobs} if knobs else {})},
        "method": {"name": "lora", "rank": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": str(work / "data/train.json"), "eval": str(work / "data/eval.json"), "max_length": args.max_length},
        "train": {"max_steps": 1, "lr": 1e-3, "batch_size": 1, "warmup_steps": 0, "eval_every": 0},
    }
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    runs = []
    run_dir, merged = work / "run", work / "merged"
    if not (run_dir / "adapter").is_dir():
        shutil.rmtree(run_dir, ignore_errors=True)
        command = ["edgetune", "train", str(work / "recipe.yaml"), "--out", str(run_dir)]
        print(f"[bench] {' '.join(command)}", file=sys.stderr, flush=True)
        train = run_measured(command, work / "train.log", args.max_gb, stages=False)
        train.update(step="train (1 step, not the subject)", status="ok" if train["rc"] == 0 else f"exit {train['rc']}")
        add_ratios(train, fp32_bytes)
        runs.append(train)
        if train["rc"] != 0:
            train["error_tail"] = tail(train["log"])
            return runs
    command = ["edgetune", "merge", str(run_dir), "--out", str(merged), "--overwrite"]
    print(f"[bench] {' '.join(command)}", file=sys.stderr, flush=True)
    merge = run_measured(command, work / "merge.log", args.max_gb, args.stages)
    merge.update(step="merge", status="ok" if merge["rc"] == 0 else ("killed above --max-gb" if merge["killed_at"] else f"exit {merge['rc']}"))
    if merge["rc"] == 0:
        provenance = json.loads((merged / "edgetune.json").read_text())
        merge["max_logit_diff"] = provenance.get("merge", {}).get("max_logit_diff")
        merge["merged_mb"] = round(sum(bundle_files(merged).values()) / 1e6, 1)
    else:
        merge["error_tail"] = tail(merge["log"])
    add_ratios(merge, fp32_bytes)
    runs.append(merge)
    print(f"[bench] merge: {summary_line(merge)}", file=sys.stderr, flush=True)
    return runs


def add_ratios(run: dict, fp32_bytes: int) -> None:
    for key in ("peak_rss", "peak_anon", "vm_hwm"):
        if run.get(key):
            run[f"{key}_ratio"] = round(run[key] / fp32_bytes, 2)
    run["stages"] = stage_table(run.pop("timeline", []))


def summary_line(run: dict) -> str:
    return (f"{run['status']}, {run.get('wall_s', 0):.0f}s, peak RSS {run.get('peak_rss', 0) / GB:.2f} GB "
            f"({run.get('peak_rss_ratio', 0)}x fp32), anon {run.get('peak_anon', 0) / GB:.2f} GB ({run.get('peak_anon_ratio', 0)}x)")


# ---- report ----------------------------------------------------------------------------------------


def markdown(shape: str, facts: dict, runs: list[dict]) -> str:
    lines = [f"### {shape}: {facts['parameters'] / 1e6:.1f}M parameters, fp32 {facts['fp32_bytes'] / GB:.2f} GB", ""]
    lines += ["| run | status | wall s | peak RSS GB | peak anon GB | VmHWM GB | RSS / fp32 | anon / fp32 | bundle MB | largest file MB | file > 2 GB |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for run in runs:
        if "wall_s" not in run:
            lines.append(f"| {run.get('precision') or run.get('step')} | {run['status']} | | | | | | | | | |")
            continue
        size = run.get("bundle_mb", run.get("merged_mb", ""))
        lines.append(
            f"| {run.get('precision') or run.get('step')} | {run['status']} | {run['wall_s']:.0f} | {run['peak_rss'] / GB:.2f} | "
            f"{run['peak_anon'] / GB:.2f} | {run['vm_hwm'] / GB:.2f} | {run.get('peak_rss_ratio', '')} | {run.get('peak_anon_ratio', '')} | "
            f"{size} | {run.get('largest_file_mb', '')} | {', '.join(run.get('over_2gb', [])) or ('no' if 'over_2gb' in run else '')} |"
        )
    for run in runs:
        if run.get("stages"):
            lines += ["", f"{run.get('precision') or run.get('step')}: stages (in-process samples every 0.2 s)", "",
                      "| stage (edgetune functions on the stack) | starts s | s | peak RSS GB | peak anon GB | below it |",
                      "| --- | ---: | ---: | ---: | ---: | --- |"]
            for stage in run["stages"]:
                lines.append(f"| {stage['stage']} | {stage['first_s']:.0f} | {stage['s']:.0f} | {stage['peak_rss'] / GB:.2f} | "
                             f"{stage['peak_anon'] / GB:.2f} | {', '.join(stage['libs'])} |")
    return "\n".join(lines)


def machine() -> dict:
    import onnxruntime
    import torch
    import transformers

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "git": subprocess.run(["git", "-C", str(HERE), "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shapes", nargs="*", default=["smolvlm-256m", "qwen2-vl-2b"], help=f"from {', '.join(real_shapes.shape_names())}")
    parser.add_argument("--work", type=Path, default=None, help="where models, runs and bundles go (default: a new dir under /tmp)")
    parser.add_argument("--model-dir", type=Path, default=None, help="reuse this model directory (one shape only)")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--merge", action="store_true", help="measure `edgetune merge` (after a 1-step run) instead of export")
    parser.add_argument("--max-length", type=int, default=256, help="--merge: the recipe's data.max_length")
    parser.add_argument("--max-gb", type=float, default=14.0, help="kill a child whose process tree's RSS passes this")
    parser.add_argument("--no-stages", dest="stages", action="store_false", help="no in-child stage timeline")
    parser.add_argument("--keep-bundles", action="store_true")
    parser.add_argument("--edgetune-src", type=Path, default=None,
                        help="run the edgetune package found in this directory (e.g. `git archive REV | tar -x -C DIR`) instead of the installed one")
    args = parser.parse_args()
    global SOURCE_TREE
    SOURCE_TREE = str(args.edgetune_src.resolve()) if args.edgetune_src else ""
    if args.model_dir and len(args.shapes) != 1:
        parser.error("--model-dir goes with exactly one shape")
    work_root = args.work or Path(tempfile.mkdtemp(prefix="bench-export-"))
    precisions = ["fp32"] + [p for p in args.precisions.split(",") if p and p != "fp32"]
    result = {"machine": machine(), "mode": "merge" if args.merge else "export", "edgetune_src": SOURCE_TREE or "installed", "shapes": {}}
    for shape in args.shapes:
        work = work_root / shape
        work.mkdir(parents=True, exist_ok=True)
        model_dir = args.model_dir or work / "model"
        if not (model_dir / "config.json").is_file():
            print(f"[bench] building {shape} into {model_dir}", file=sys.stderr, flush=True)
            real_shapes.build(shape, model_dir)
        parameters = model_parameters(model_dir)
        facts = {"model_dir": str(model_dir), "parameters": parameters, "fp32_bytes": 4 * parameters}
        runs = merge_runs(shape, model_dir, work, args, facts["fp32_bytes"]) if args.merge else \
            export_runs(model_dir, work, precisions, args, facts["fp32_bytes"])
        result["shapes"][shape] = {**facts, "runs": runs}
        print(markdown(shape, facts, runs) + "\n", flush=True)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
