"""The training loop, in the open: recipe -> 4-bit backbone -> PEFT method -> trained adapter.

Writes a run directory (atomically: a failed run leaves nothing):
  recipe.yaml      the resolved recipe (absolute paths), re-runnable with ``edgetune train``
  adapter/         the method's artifact (peft format, safetensors, for LoRA)
  metrics.jsonl    one JSON object per logged step and per held-out evaluation
  loss.png         train and held-out loss curves
  run.json         summary: family, trainable parameters, time, peak memory, final losses
Same seed, same data, same machine -> the same losses on CPU.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from edgetune.data import Sample, collate, load_samples
from edgetune.io import atomic_output_dir
from edgetune.load import count_parameters, detect_family, load_backbone, resolve_compute_dtype, resolve_device
from edgetune.methods import get_method
from edgetune.progress import PeakMemory, console, step_progress
from edgetune.recipe import Recipe, save_recipe


@dataclass
class TrainResult:
    run_dir: str
    family: str
    method: str
    trainable_params: int
    total_params: int
    steps: int
    first_loss: float
    final_loss: float
    eval_loss: float | None
    train_seconds: float
    peak_memory_mb: float
    tokens_per_second: float


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class EncodedDataset(torch.utils.data.Dataset):
    """Encodes lazily so that large image sets are never held in memory at once."""

    def __init__(self, samples: list[Sample], processor: Any, family: Any, max_length: int):
        self.samples, self.processor, self.family, self.max_length = samples, processor, family, max_length

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.family.encode_sample(self.processor, self.samples[i], self.max_length)


def make_optimizer(recipe: Recipe, params: list[torch.nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    cfg = recipe.train
    if cfg.optimizer == "paged_adamw_8bit":
        if device.type != "cuda":
            from edgetune.errors import UserError

            raise UserError("train.optimizer: paged_adamw_8bit needs a CUDA GPU; use adamw on CPU")
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_schedule(recipe: Recipe, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    cfg = recipe.train
    warmup, total = cfg.warmup_steps, cfg.max_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def batches_forever(dataset: EncodedDataset, batch_size: int, pad_id: int, seed: int, num_workers: int = 0):
    """Shuffled batches without end. The order comes from one generator seeded with ``seed`` in this
    process and encoding is deterministic, so the batches are the same whatever ``num_workers``."""
    if num_workers:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers are forked after tokenizing
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        generator=generator,
        collate_fn=functools.partial(collate, pad_id=pad_id),
        drop_last=len(dataset) >= batch_size,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )
    while True:
        yield from loader


def resolve_num_workers(setting: int | str, device: torch.device) -> int:
    """train.num_workers "auto": 2 worker processes on CUDA, none on CPU, where the step itself
    keeps every core busy and a worker would only take cores from it."""
    if setting == "auto":
        return 2 if device.type == "cuda" else 0
    return int(setting)


def to_device(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    return {k: v.to(device, dtype=dtype if v.is_floating_point() else None) for k, v in batch.items()}


@torch.no_grad()
def held_out_loss(model: Any, dataset: EncodedDataset, pad_id: int, batch_size: int, limit: int, device, dtype) -> float:
    """Mean cross-entropy over every answer token of the first ``limit`` samples."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, min(limit, len(dataset)), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, limit, len(dataset)))]
        batch = to_device(collate(items, pad_id), device, dtype)
        with autocast(device, dtype):
            loss_sum, tokens = answer_token_loss(model, dataset.family, batch)
        total, count = total + float(loss_sum), count + tokens
    model.train()
    return total / max(1, count)


def answer_token_loss(model: Any, family: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
    """(sum of cross-entropy over the answer tokens of ``batch``, their number).

    The LM head sees only the hidden states that predict a label: a pre-hook on it keeps the
    positions t whose next token labels[:, t + 1] is not -100 and hands it [1, N, hidden] instead of
    [batch, seq, hidden]. The logits are then [1, N, vocab] (N = answer tokens, a few dozen per
    sample) where the plain path builds [batch, seq, vocab]: 0.6 GB at 1,024 tokens and Qwen2-VL's
    151,936-token vocabulary, plus its gradient and the softmax. The loss is the same sum the plain
    ``model(**batch).loss`` averages (transformers' ForCausalLMLoss), so loss_sum / N equals it.
    Every family's forward is untouched: the hook works for any model whose LM head is the output
    embedding and whose hidden sequence is the labels' sequence; ``family.training_inputs`` gives
    the model what it needs without labels (PaliGemma: its prefix-LM mask).
    """
    labels = batch["labels"]
    targets = labels[:, 1:]
    keep = answer_mask(labels)

    def answer_positions_only(module: torch.nn.Module, args: tuple) -> tuple:
        hidden = args[0]
        if hidden.shape[:2] != labels.shape:
            raise RuntimeError(f"LM head input {tuple(hidden.shape)} does not line up with labels {tuple(labels.shape)}")
        return (hidden[:, :-1][keep].unsqueeze(0), *args[1:])

    handle = model.get_output_embeddings().register_forward_pre_hook(answer_positions_only)
    try:
        logits = model(**family.training_inputs(batch), use_cache=False).logits
    finally:
        handle.remove()
    loss_sum = torch.nn.functional.cross_entropy(logits[0].float(), targets[keep], reduction="sum")
    return loss_sum, int(keep.sum())


def answer_mask(labels: torch.Tensor) -> torch.Tensor:
    """labels [..., seq] -> bool [..., seq - 1]: True where position t predicts a label (labels[t + 1])."""
    return labels[..., 1:] != -100


def answer_tokens(batch: dict[str, Any]) -> int:
    """The tokens ``batch`` is trained on: labels that a previous position predicts."""
    return int(answer_mask(batch["labels"]).sum())


def accumulate_gradients(model: Any, family: Any, micro_batches: list[dict[str, Any]], device, dtype) -> float:
    """Backward over the micro-batches of one optimizer step; returns the step's loss.

    The step's loss is the mean over ALL answer tokens of its micro-batches, not the mean of the
    per-micro-batch means: each micro-batch's sum is divided by the step's answer-token count before
    its backward. So batch_size 8 x grad_accum 1 and batch_size 2 x grad_accum 4 on the same data
    give the same gradient, whatever the answers' lengths (as transformers' Trainer does with
    num_items_in_batch).
    """
    total_tokens = max(1, sum(answer_tokens(batch) for batch in micro_batches))
    step_loss = 0.0
    for micro in micro_batches:
        batch = to_device(micro, device, dtype)
        with autocast(device, dtype):
            loss_sum, _ = answer_token_loss(model, family, batch)
        loss = loss_sum / total_tokens
        loss.backward()
        step_loss += loss.item()
    return step_loss


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for a bf16/fp16 backbone: the trainable parameters stay fp32 (master weights),
    so their matmuls with low-precision activations need autocast, on CPU (bf16) as on CUDA."""
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)


def train(recipe: Recipe, run_dir: Path, overwrite: bool = False) -> TrainResult:
    """Fine-tune per ``recipe`` and write the run directory described in the module docstring."""
    method = get_method(recipe.method)
    method.check_family(detect_family(recipe.model)[0], recipe.method)  # before any work: can this family train and export it?
    train_samples = load_samples(recipe.data.train)
    eval_samples = load_samples(recipe.data.eval) if recipe.data.eval else []
    with atomic_output_dir(run_dir, overwrite) as scratch:
        seed_everything(recipe.train.seed)
        device = resolve_device(recipe.train.device)
        dtype = resolve_compute_dtype(recipe.train.precision, device)
        with console.status(f"loading {recipe.model.path} ({recipe.quantization.mode})"):
            backbone = load_backbone(recipe.model, recipe.quantization, device, dtype)
        model = method.attach(backbone.model, backbone.family, recipe.method)
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()  # fp32 master weights for the few trainable params
        if recipe.train.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        trainable, total = count_parameters(model)
        console.print(
            f"{backbone.family.name} | {method.name} | trainable parameters: {trainable:,} of {total:,} "
            f"({100 * trainable / total:.3f}%) | {device.type} {str(dtype).removeprefix('torch.')}"
        )
        if recipe.train.cache_image_features:  # the frozen tower runs once per image, then leaves memory
            from edgetune.image_cache import cache_image_features

            cache_image_features(model, backbone, train_samples + eval_samples, recipe.data.max_length, device, dtype)
        with PeakMemory(device.type) as memory:
            result = _loop(recipe, model, backbone, train_samples, eval_samples, scratch, device, dtype, memory)
        method.save(model, scratch / "adapter")
        save_recipe(recipe, scratch / "recipe.yaml")
        summary = TrainResult(str(run_dir), backbone.family.name, method.name, trainable, total, **result)
        (scratch / "run.json").write_text(json.dumps(asdict(summary), indent=2))
        plot_losses(scratch / "metrics.jsonl", scratch / "loss.png")
    return summary


def _loop(recipe, model, backbone, train_samples, eval_samples, run_dir: Path, device, dtype, memory: PeakMemory) -> dict[str, Any]:
    cfg = recipe.train
    pad_id = backbone.processor.tokenizer.pad_token_id
    train_set = EncodedDataset(train_samples, backbone.processor, backbone.family, recipe.data.max_length)
    eval_set = EncodedDataset(eval_samples, backbone.processor, backbone.family, recipe.data.max_length)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(recipe, params, device)
    schedule = make_schedule(recipe, optimizer)
    batches = batches_forever(train_set, cfg.batch_size, pad_id, cfg.seed, resolve_num_workers(cfg.num_workers, device))
    losses: list[float] = []
    eval_loss = None
    tokens_seen, start = 0, time.perf_counter()
    with open(run_dir / "metrics.jsonl", "w") as log, step_progress("train") as progress:
        task = progress.add_task("train", total=cfg.max_steps, stats="")
        for step in range(1, cfg.max_steps + 1):
            step_start = time.perf_counter()
            micro_batches = [next(batches) for _ in range(cfg.grad_accum)]
            step_loss = accumulate_gradients(model, backbone.family, micro_batches, device, dtype)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
            step_tokens = sum(int(batch["attention_mask"].sum()) for batch in micro_batches)
            tokens_seen += step_tokens
            elapsed = time.perf_counter() - start
            record = {"step": step, "loss": step_loss, "lr": schedule.get_last_lr()[0],
                      "tokens": step_tokens, "step_s": time.perf_counter() - step_start,
                      "tokens_per_s": tokens_seen / elapsed, "peak_mem_mb": memory.mb}
            log.write(json.dumps(record) + "\n")
            if eval_set and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                eval_loss = held_out_loss(model, eval_set, pad_id, cfg.batch_size, cfg.eval_samples, device, dtype)
                log.write(json.dumps({"step": step, "eval_loss": eval_loss}) + "\n")
            stats = f"loss {step_loss:.3f}" + (f" | eval {eval_loss:.3f}" if eval_loss is not None else "")
            stats += f" | {record['tokens_per_s']:.0f} tok/s | peak {record['peak_mem_mb']:.0f} MB"
            progress.update(task, advance=1, stats=stats)
    seconds = time.perf_counter() - start
    return dict(
        steps=cfg.max_steps,
        first_loss=losses[0],
        final_loss=sum(losses[-5:]) / len(losses[-5:]),
        eval_loss=eval_loss,
        train_seconds=seconds,
        peak_memory_mb=memory.mb,
        tokens_per_second=tokens_seen / seconds,
    )


def plot_losses(metrics_file: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    held = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*train), label="train loss", linewidth=1)
    if held:
        ax.plot(*zip(*held), "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
