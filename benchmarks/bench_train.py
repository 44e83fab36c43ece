"""edgetune's training step beside a QLoRA baseline written as the peers' docs write it, at real model shapes.

What is compared. For each shape (a benchmarks/configs/ name: smolvlm-256m, qwen2-vl-2b, and opt-in
paligemma-3b-224, llava-1.5-7b), two engines train the same random-weight model (built by
benchmarks/real_shapes.py at the checkpoint's published sizes; nothing downloaded) on the same data,
with the same batch size, for 1 warm-up step + ``--steps`` measured steps:

- edgetune: the real CLI, ``edgetune train RECIPE --out RUN``, with a recipe this script writes: NF4
  (double quantization), LoRA rank 16 / alpha 32 / dropout 0.05 on the LLM's attention and MLP linears,
  the connector trained, gradient checkpointing on, AdamW, grad_accum 1, no held-out evaluation.
  Its numbers come from RUN/metrics.jsonl (one record per step: ``step_s``, ``tokens``, ``peak_mem_mb``).
- baseline: a plain loop as the transformers/peft/bitsandbytes docs write QLoRA (``worker_baseline``):
  ``from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True, nf4, double quant,
  compute dtype, llm_int8_skip_modules=[vision tower, connector, lm_head]))``,
  ``prepare_model_for_kbit_training(use_gradient_checkpointing=True, use_reentrant=False)``,
  ``get_peft_model(LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=<the same regex of
  the LLM's linears>, modules_to_save=[connector]))``, then ``loss = model(**batch).loss;
  loss.backward(); optimizer.step(); optimizer.zero_grad()`` with torch AdamW (on CUDA under bf16
  autocast, as Trainer(bf16=True) runs it).

Why it is fair.
- Same tokens: the baseline encodes the samples with edgetune's own ``family.encode_sample`` and pads
  them with ``edgetune.data.collate`` (the same processor settings, chat template and label masking),
  so both engines see identical input_ids, labels and pixels; that costs the baseline nothing a
  peer's collator would not cost. Encoding happens inside each timed step on both sides (edgetune's
  DataLoader has no workers on CPU; the baseline's neither), so tokens/s is end to end for both.
- Same modules: the LoRA targets, the trained connector (peft modules_to_save) and the modules kept
  out of 4 bits (``family.keep_precise()``) are the same on both sides; only how edgetune runs the
  step may differ.
- Same memory accounting. Peak memory is, on CPU, the peak of the process's anonymous resident
  memory (RssAnon, sampled every 20 ms by ``edgetune.progress.PeakMemory``) from the start of the
  first step to the end of the last, on both sides; on CUDA, ``torch.cuda.max_memory_allocated``
  over the same span. After loading, transformers leaves the weights it did not quantize (vision
  tower, embeddings, lm_head, norms) as views of the memory-mapped safetensors files, which
  anonymous memory does not count; edgetune copies them out of the mapping after loading, so the
  baseline's model goes through the same ``edgetune.load.release_checkpoint_files`` right after
  ``from_pretrained``: both count their weights the same way. The whole process's peak resident set
  (ru_maxrss of the child: VmHWM, loading included, mapped files included) is shown beside it.
- tokens/s counts attention-mask tokens over the measured steps, the warm-up step excluded.
- One process per engine and run (its own peak, its own allocator), run one after the other.

The data: a LLaVA-format JSON with one distinct random image per sample, all the same size, and one
question/answer pair whose question is filled with words until the encoded sequence reaches
``--seq`` tokens (image tokens + text). The image size is picked per family so that images take about
85% of the sequence where the family lets the image token count vary (SmolVLM: the tile grid through
``longest_edge``; Qwen2-VL: the pixel count through ``max_pixels``), and is the model's fixed size
otherwise (PaliGemma 256 tokens, LLaVA-1.5 576). The answer is a few dozen tokens.

Memory and the allocator. glibc's malloc keeps freed heap memory (its mmap threshold rises after
the first large frees), so the anonymous peak counts freed-but-kept memory besides live tensors: at
SmolVLM-256M and 1,024 tokens about 1.2 GB of edgetune's ~3 GB, and it varies by a few hundred MB
from run to run (the 20 ms sampling agrees with the kernel's VmHWM, so it is not sampling error).
The environment reaches both children unchanged: ``MALLOC_MMAP_THRESHOLD_=1048576 python
benchmarks/bench_train.py ...`` gives peaks close to the live tensors (at some speed cost), the
default run gives what a user sees.

``--checkpointing-sweep`` adds a table of edgetune's peak memory and tokens/s with gradient
checkpointing on and off at several sequence lengths (``--sweep-seqs``, planned as above, so the
image share grows with them) at ``--sweep-shape``: what checkpointing saves, and how the peak grows
with the sequence.

Models come from ``--models-dir/NAME`` (built there by benchmarks/real_shapes.py when missing: fp32,
except llava-1.5-7b in its published float16, 14 GB on disk instead of 28) or ``--model-dir NAME=DIR``
(a tiny model from FAMILIES[...].build_tiny runs the whole bench in a minute, for development).
PaliGemma-3B (12 GB fp32) and LLaVA-1.5-7B are opt-in: in 4 bits both fit this 24 GiB machine, but a
step takes many minutes on 2 cores.

    python benchmarks/bench_train.py [--shapes smolvlm-256m,qwen2-vl-2b] [--steps 2] [--seq 1024]
        [--batch 1] [--models-dir /tmp/rs] [--work /tmp/bt] [--checkpointing-sweep]

Prints a table per run, then one line per shape:
``RESULT shape=<name> edgetune_peak_mb=<a> baseline_peak_mb=<b> edgetune_tok_s=<c> baseline_tok_s=<d>``.
Run it alone on the machine: other work changes every number (the load average is printed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SHAPES = ("smolvlm-256m", "qwen2-vl-2b", "paligemma-3b-224", "llava-1.5-7b")
DEFAULT_SHAPES = "smolvlm-256m,qwen2-vl-2b"
BUILD_DTYPE = {"llava-1.5-7b": "float16"}  # fp32 would be 28 GB on disk
IMAGE_SHARE = 0.85  # of the sequence, where the family lets the image token count vary
LORA = {"rank": 16, "alpha": 32.0, "dropout": 0.05}
LR = 2e-4
SEED = 0
FILLER = ("look closely at the small object near the left edge of the picture and describe its colour "
          "shape size texture and position relative to the other things around it")
ANSWER = "A small red cube with rounded corners, on a grey table beside a blue sphere and a green cylinder."


# ---- the data: image size per family, question filled to the target length -------------------------


def tile_grid(image_tokens: int, tokens_per_tile: int, max_side: int = 4) -> tuple[int, int] | None:
    """SmolVLM (idefics3): the (rows, cols) grid, rows <= cols <= max_side, whose tiles plus the global
    image (each tile ``tokens_per_tile`` + 2 marker tokens) come closest to ``image_tokens`` without
    exceeding it, the squarest of equals; None when not even a 1 x 2 grid fits (then the image is one
    tile, not split)."""
    fits = [(rows, cols) for rows in range(1, max_side + 1) for cols in range(max(rows, 2), max_side + 1)
            if (rows * cols + 1) * (tokens_per_tile + 2) <= image_tokens]
    return max(fits, key=lambda grid: (grid[0] * grid[1], grid[0] - grid[1]), default=None)  # most tiles, squarest


def patch_grid(image_tokens: int) -> tuple[int, int]:
    """Qwen2-VL: (rows, cols) of merged patches, near square, rows * cols <= image_tokens."""
    rows = max(1, math.isqrt(image_tokens))
    return rows, max(1, image_tokens // rows)


def image_plan(family: str, processor: Any, budget: int) -> tuple[tuple[int, int], dict[str, Any]]:
    """((width, height) of the images, recipe model.processor settings) for at most about ``budget``
    image tokens (exactly the model's own count where it is fixed)."""
    ip = processor.image_processor
    if family in ("idefics3", "smolvlm"):
        tile = ip.max_image_size["longest_edge"]
        grid = tile_grid(budget, processor.image_seq_len)
        if grid is None:
            return (tile, tile), {"do_image_splitting": False}
        rows, cols = grid
        return (cols * tile, rows * tile), {"longest_edge": cols * tile}
    if family in ("qwen2_vl", "qwen2_5_vl"):
        unit = ip.patch_size * ip.merge_size
        rows, cols = patch_grid(budget)
        return (cols * unit, rows * unit), {"max_pixels": rows * cols * unit * unit}
    if family == "paligemma":
        return (ip.size["width"], ip.size["height"]), {}
    if family == "llava":
        return (ip.crop_size["width"], ip.crop_size["height"]), {}
    raise SystemExit(f"bench_train: no image plan for family '{family}'")


def most_words_within(length_of: Callable[[int], int], target: int) -> int:
    """The largest n with length_of(n) <= target, for a length_of that grows with n (n >= 0)."""
    if length_of(0) > target:
        raise SystemExit(f"bench_train: the image alone takes {length_of(0)} tokens, more than --seq {target}")
    good, bad = 0, 1
    while length_of(bad) <= target:
        good, bad = bad, bad * 2
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if length_of(middle) <= target else (good, middle)
    return good


def write_image(path: Path, size: tuple[int, int], seed: int) -> None:
    """A smooth random picture (small random grid, upscaled): cheap to store, not blank."""
    import numpy as np
    from PIL import Image

    grid = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    Image.fromarray(grid).resize(size, Image.BICUBIC).save(path)


def question(words: int) -> str:
    filler = FILLER.split()
    return "Describe the picture. " + " ".join(filler[i % len(filler)] for i in range(words))


def encoded_length(family: Any, processor: Any, image: Path, words: int, image_token_id: int) -> tuple[int, int, int]:
    """(tokens, image tokens, tokens in the loss) of a sample with ``words`` filler words, encoded by
    edgetune's own family.encode_sample."""
    from edgetune.data import Sample

    sample = Sample("fit", [image], [("user", question(words)), ("assistant", ANSWER)])
    encoded = family.encode_sample(processor, sample, max_length=10**6)
    ids = encoded["input_ids"]
    return len(ids), int((ids == image_token_id).sum()), int((encoded["labels"] != -100).sum())


def prepare_data(model_dir: Path, out: Path, seq: int, samples: int) -> dict:
    """data.json under ``out``: ``samples`` entries of one length, the longest <= ``seq``, each with
    its own random image of the family's planned size; returns the dataset's facts."""
    from transformers import AutoConfig

    from edgetune.families import family_of_model_dir

    family = family_of_model_dir(model_dir)
    processor = family.load_processor(str(model_dir))
    image_token_id = family.image_token_id(AutoConfig.from_pretrained(model_dir))
    out.mkdir(parents=True, exist_ok=True)
    images = [out / f"image-{i}.png" for i in range(samples)]
    budget = int(IMAGE_SHARE * seq)
    for _ in range(2):  # a second plan when the prompt and answer leave less than 1 - IMAGE_SHARE
        size, knobs = image_plan(family.name, processor, budget)
        family.configure_processor(processor, knobs)
        write_image(images[0], size, seed=0)
        tokens, image_tokens, _ = encoded_length(family, processor, images[0], 0, image_token_id)
        if tokens <= seq:
            break
        budget = seq - (tokens - image_tokens)
    words = most_words_within(lambda n: encoded_length(family, processor, images[0], n, image_token_id)[0], seq)
    tokens, image_tokens, answer_tokens = encoded_length(family, processor, images[0], words, image_token_id)
    for i, image in enumerate(images[1:], start=1):
        write_image(image, size, seed=i)
    entries = [
        {"id": f"s{i}", "image": image.name,
         "conversations": [{"from": "human", "value": "<image>\n" + question(words)}, {"from": "gpt", "value": ANSWER}]}
        for i, image in enumerate(images)
    ]
    (out / "data.json").write_text(json.dumps(entries, indent=1))
    return {"path": str(out / "data.json"), "family": family.name, "knobs": knobs, "tokens": tokens,
            "image_tokens": image_tokens, "answer_tokens": answer_tokens, "image_size": list(size)}


# ---- edgetune: the CLI on a recipe --------------------------------------------------------------------


def write_recipe(path: Path, model_dir: Path, data: dict, batch: int, steps: int, checkpointing: bool, device: str) -> None:
    import yaml

    recipe = {
        "model": {"path": str(model_dir), "processor": data["knobs"]},
        "quantization": {"mode": "nf4", "double_quant": True},
        "method": {"name": "lora", **LORA, "placement": "both", "train_connector": True},
        "data": {"train": data["path"], "max_length": data["tokens"] + 64},
        "train": {"max_steps": steps, "batch_size": batch, "grad_accum": 1, "lr": LR, "warmup_steps": 0,
                  "schedule": "constant", "optimizer": "adamw", "gradient_checkpointing": checkpointing,
                  "device": device, "eval_every": 0, "seed": SEED},
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))


def edgetune_steps(records: list[dict], tokens_per_step: int) -> list[dict]:
    """Per-step {step_s, tokens, peak_mb, loss} from metrics.jsonl's training records. Records without
    ``step_s``/``tokens`` (an older edgetune) are derived from the cumulative ``tokens_per_s`` and the
    known tokens per step (every sample has the same length)."""
    train = [r for r in records if "loss" in r]
    steps, elapsed_before = [], 0.0
    for i, record in enumerate(train):
        tokens = record.get("tokens", tokens_per_step)
        if "step_s" in record:
            seconds = record["step_s"]
        else:
            elapsed = (i + 1) * tokens_per_step / record["tokens_per_s"]
            seconds, elapsed_before = elapsed - elapsed_before, elapsed
        steps.append({"step_s": seconds, "tokens": tokens, "peak_mb": record.get("peak_mem_mb"), "loss": record["loss"]})
    return steps


def run_edgetune(model_dir: Path, data: dict, work: Path, batch: int, steps: int, checkpointing: bool, device: str) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    recipe, run_dir = work / "recipe.yaml", work / "run"
    write_recipe(recipe, model_dir, data, batch, 1 + steps, checkpointing, device)
    edgetune = Path(sys.executable).parent / "edgetune"
    command = [str(edgetune), "train", str(recipe), "--out", str(run_dir), "--overwrite"]
    child = run_child(command, work / "edgetune.log")
    if child["returncode"]:
        return {**child, "error": log_tail(work / "edgetune.log")}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    per_step = edgetune_steps(records, batch * data["tokens"])
    return {**child, **summarize(per_step)}


# ---- baseline: the peers' documented QLoRA loop ---------------------------------------------------------


def worker_baseline(spec: dict) -> dict:
    """The baseline's whole run, in this (child) process; see the module docstring."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    from edgetune.data import collate, load_samples
    from edgetune.families import FAMILIES
    from edgetune.load import release_checkpoint_files
    from edgetune.progress import PeakMemory

    torch.manual_seed(SEED)
    family = FAMILIES[spec["family"]]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    compute = torch.bfloat16 if cuda else torch.float32
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
        llm_int8_skip_modules=family.keep_precise(),
    )
    model = family.model_class().from_pretrained(
        spec["model"], quantization_config=bnb, dtype=compute, device_map={"": 0} if cuda else {"": "cpu"}
    )
    released_mb = release_checkpoint_files(model) / 2**20  # what edgetune's load_backbone does: see the docstring
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=spec["checkpointing"], gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    model = get_peft_model(model, LoraConfig(
        r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], bias="none",
        target_modules=family.linear_regex("both"), modules_to_save=[family.connector.split(".")[-1]],
    ))
    model.train()

    processor = family.load_processor(spec["model"])
    family.configure_processor(processor, spec["knobs"])
    samples = load_samples(Path(spec["data"]))
    pad_id = processor.tokenizer.pad_token_id
    loader = torch.utils.data.DataLoader(
        samples, batch_size=spec["batch"], shuffle=False,
        collate_fn=lambda items: collate([family.encode_sample(processor, s, spec["max_length"]) for s in items], pad_id),
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    per_step = []
    with PeakMemory(device.type) as memory:
        batches = iter(loader)
        for _ in range(spec["steps"]):
            started = time.perf_counter()
            batch = {k: v.to(device) for k, v in next(batches).items()}
            with torch.autocast(device_type=device.type, dtype=compute, enabled=cuda):
                loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            loss_value = loss.item()  # waits for the step, as a logging loop does
            per_step.append({"step_s": time.perf_counter() - started, "tokens": int(batch["attention_mask"].sum()),
                             "peak_mb": memory.mb, "loss": loss_value})
    return {**summarize(per_step), "released_mb": released_mb}


def run_baseline(model_dir: Path, data: dict, work: Path, batch: int, steps: int, checkpointing: bool = True) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    spec = {"model": str(model_dir), "family": data["family"], "knobs": data["knobs"], "data": data["path"],
            "max_length": data["tokens"] + 64, "batch": batch, "steps": 1 + steps, "checkpointing": checkpointing,
            "result": str(work / "baseline.json")}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "baseline", "--spec", json.dumps(spec)]
    child = run_child(command, work / "baseline.log")
    if child["returncode"]:
        return {**child, "error": log_tail(work / "baseline.log")}
    return {**child, **json.loads(Path(spec["result"]).read_text())}


# ---- measurement helpers ------------------------------------------------------------------------------


def summarize(per_step: list[dict], warmup: int = 1) -> dict:
    """tokens/s and seconds per step over the steps after ``warmup``; the last peak (a peak so far)."""
    timed = per_step[warmup:] or per_step
    seconds = sum(s["step_s"] for s in timed)
    return {
        "steps": per_step,
        "tok_s": sum(s["tokens"] for s in timed) / seconds,
        "step_s": seconds / len(timed),
        "peak_mb": per_step[-1]["peak_mb"],
        "first_loss": per_step[0]["loss"],
    }


THREADS: dict[str, str] = {}  # --threads: the same OMP/MKL thread count for every child


def run_child(command: list[str], logfile: Path) -> dict:
    """Run ``command`` to completion with its output in ``logfile``; its exit code, wall time and
    peak resident set (ru_maxrss of this very child, from wait4: loading and mapped files included)."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", **THREADS)
    log(" ".join(command[:3]) + f" ...  (log {logfile})")
    started, load = time.perf_counter(), os.getloadavg()[0]
    with open(logfile, "w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=HERE.parent)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    return {"returncode": child.returncode, "wall_s": time.perf_counter() - started,
            "process_peak_mb": usage.ru_maxrss / 1024, "load1_before": load}


def log_tail(path: Path, lines: int = 8) -> str:
    return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])


def log(message: str) -> None:
    print(f"[bench_train] {message}", file=sys.stderr, flush=True)


def model_dir_for(name: str, models_dir: Path, given: dict[str, Path]) -> Path:
    """--model-dir NAME=DIR, else models_dir/NAME, built there with benchmarks/real_shapes.py if missing."""
    if name in given:
        return given[name]
    target = models_dir / name
    if not (target / "config.json").is_file():
        dtype = BUILD_DTYPE.get(name, "float32")
        log(f"building {name} ({dtype}) into {target}")
        command = [sys.executable, str(HERE / "real_shapes.py"), name, "--out", str(target), "--dtype", dtype]
        subprocess.run(command, check=True)
    return target


def train_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ---- the report -----------------------------------------------------------------------------------------


def result_line(shape: str, edgetune: dict, baseline: dict) -> str:
    def value(run: dict, key: str, digits: int) -> str:
        return f"{run[key]:.{digits}f}" if key in run else "nan"

    return (f"RESULT shape={shape} edgetune_peak_mb={value(edgetune, 'peak_mb', 0)} baseline_peak_mb={value(baseline, 'peak_mb', 0)} "
            f"edgetune_tok_s={value(edgetune, 'tok_s', 2)} baseline_tok_s={value(baseline, 'tok_s', 2)}")


def run_row(engine: str, run: dict) -> str:
    if "error" in run:
        return f"| {engine} | failed: {run['error'].splitlines()[-1][:90]} | | | | | |"
    return (f"| {engine} | {run['peak_mb']:.0f} | {run['process_peak_mb']:.0f} | {run['tok_s']:.2f} | {run['step_s']:.3g} "
            f"| {run['first_loss']:.4f} | {run['load1_before']:.1f} |")


def print_shape_table(shape: str, data: dict, batch: int, steps: int, device: str, edgetune: dict, baseline: dict) -> None:
    print(f"\n### {shape} ({data['family']}): {data['tokens']} tokens a sample ({data['image_tokens']} image, "
          f"{data['answer_tokens']} in the loss), images {data['image_size'][0]}x{data['image_size'][1]} "
          f"{data['knobs'] or ''}, batch {batch}, 1 warm-up + {steps} measured steps, {device}\n")
    memory = "peak MB (CUDA allocated)" if device == "cuda" else "peak MB (anonymous)"
    print(f"| engine | {memory} | process peak RSS MB | tokens/s | s/step | first loss | load before |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(run_row("edgetune", edgetune))
    print(run_row("baseline (transformers + peft + bnb loop)", baseline))
    if "peak_mb" in edgetune and "peak_mb" in baseline:
        print(f"\nedgetune / baseline: peak memory {edgetune['peak_mb'] / baseline['peak_mb']:.2f}x, "
              f"tokens/s {edgetune['tok_s'] / baseline['tok_s']:.2f}x (the baseline's {baseline['released_mb']:.0f} MB of "
              "unquantized weights copied out of the mapped checkpoint, as edgetune does)")


def checkpointing_sweep(shape: str, model_dir: Path, work: Path, seqs: list[int], batch: int, steps: int, device: str) -> None:
    rows = []
    for seq in seqs:
        data = prepare_data(model_dir, work / f"seq{seq}" / "data", seq, batch * (1 + steps))
        runs = {on: run_edgetune(model_dir, data, work / f"seq{seq}" / ("gc-on" if on else "gc-off"), batch, steps, on, device)
                for on in (True, False)}
        rows.append((data["tokens"], runs[True], runs[False]))

    def cell(run: dict, key: str, digits: int) -> str:
        return f"{run[key]:.{digits}f}" if key in run else "failed"

    print(f"\n### gradient checkpointing, edgetune at {shape}: peak memory and speed vs sequence length "
          f"(batch {batch}, {device})\n")
    print("| tokens a sample | peak MB, checkpointing on | peak MB, off | tokens/s on | tokens/s off |")
    print("| --- | --- | --- | --- | --- |")
    for tokens, on, off in rows:
        print(f"| {tokens} | {cell(on, 'peak_mb', 0)} | {cell(off, 'peak_mb', 0)} | {cell(on, 'tok_s', 2)} | {cell(off, 'tok_s', 2)} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"comma-separated, of: {', '.join(SHAPES)}")
    parser.add_argument("--steps", type=int, default=2, help="measured steps (after one warm-up step)")
    parser.add_argument("--seq", type=int, default=1024, help="tokens a sample, image tokens included")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--models-dir", type=Path, default=Path("/tmp/rs"))
    parser.add_argument("--model-dir", action="append", default=[], metavar="NAME=DIR", help="use DIR for shape NAME")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bt"))
    parser.add_argument("--threads", type=int, help="CPU threads of both engines (OMP_NUM_THREADS); default: torch's own (all cores)")
    parser.add_argument("--checkpointing-sweep", action="store_true")
    parser.add_argument("--sweep-shape", default="smolvlm-256m")
    parser.add_argument("--sweep-seqs", default="256,512,1024")
    parser.add_argument("--worker", choices=["baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        spec = json.loads(args.spec)
        Path(spec["result"]).write_text(json.dumps(worker_baseline(spec)))
        return

    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise SystemExit(f"--shapes: unknown {', '.join(unknown)}; known: {', '.join(SHAPES)}")
    if args.threads:
        THREADS.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    given = {k: Path(v) for k, v in (item.split("=", 1) for item in args.model_dir)}
    device = train_device()
    results = []
    for shape in shapes:
        model_dir = model_dir_for(shape, args.models_dir, given)
        work = args.work / shape / f"seq{args.seq}-b{args.batch}"
        data = prepare_data(model_dir, work / "data", args.seq, args.batch * (1 + args.steps))
        log(f"{shape}: {data['tokens']} tokens a sample ({data['image_tokens']} image tokens)")
        edgetune = run_edgetune(model_dir, data, work / "edgetune", args.batch, args.steps, True, device)
        baseline = run_baseline(model_dir, data, work / "baseline", args.batch, args.steps)
        print_shape_table(shape, data, args.batch, args.steps, device, edgetune, baseline)
        results.append(result_line(shape, edgetune, baseline))
    if args.checkpointing_sweep:
        model_dir = model_dir_for(args.sweep_shape, args.models_dir, given)
        seqs = [int(s) for s in args.sweep_seqs.split(",")]
        checkpointing_sweep(args.sweep_shape, model_dir, args.work / args.sweep_shape / "sweep", seqs, args.batch, args.steps, device)
    print()
    for line in results:
        print(line)


if __name__ == "__main__":
    main()
