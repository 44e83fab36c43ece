"""The training loop, in the open: recipe -> 4-bit backbone -> PEFT method -> trained adapter.

Writes a run directory:
  recipe.yaml      the resolved recipe (absolute paths), re-runnable with ``edgetune train``
  metrics.jsonl    one JSON object per logged step and per held-out evaluation, appended as it goes
  checkpoints/     while the run is unfinished: the newest train.keep_checkpoints checkpoints
                   (edgetune.checkpoint), from which ``edgetune train --resume RUN`` continues
  adapter/         the method's artifact (peft format, safetensors, for LoRA)   } only once the run
  loss.png         train and held-out loss curves                               } completes; run.json
  run.json         summary: family, trainable parameters, time, peak memory, final losses  } last
A run that fails before its first checkpoint leaves nothing; a run killed at any moment after it
resumes from the newest checkpoint and ends with the same tensors, bit for bit on CPU, as a run
never interrupted. Same seed, same data, same machine -> the same losses on CPU.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from edgetune.checkpoint import (
    CHECKPOINTS, Checkpoint, capture_rng, complete_checkpoints, load_latest_checkpoint, restore_rng, restore_trainable,
    save_checkpoint,
)
from edgetune.data import Sample, collate, load_samples
from edgetune.data_check import inspect_data
from edgetune.distributed import Processes, ProcessesStopped, join_processes, process_device
from edgetune.errors import UserError
from edgetune.io import check_output_dir, write_atomically
from edgetune.load import count_parameters, detect_family, load_backbone, resolve_compute_dtype, resolve_device
from edgetune.methods import get_method
from edgetune.progress import PeakMemory, console, step_progress
from edgetune.recipe import RESUMABLE_KEYS, Recipe, changed_keys, recipe_from_dict, save_recipe


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
    resumed_from: int | None = None  # the checkpoint's step when the run was resumed
    skipped_steps: int = 0  # non-finite steps skipped under train.skip_nonfinite


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
    """AdamW, or bitsandbytes' paged 8-bit AdamW (CUDA only: train() refuses it on CPU up front)."""
    cfg = recipe.train
    if cfg.optimizer == "paged_adamw_8bit":
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


class ShuffledBatches(torch.utils.data.Sampler):
    """Endless batches of dataset indices, reshuffled every epoch, in the order a DataLoader with
    shuffle=True, drop_last and a generator seeded with ``seed`` draws them (the order edgetune's
    runs have always used: per epoch, the loader's base-seed draw, the permutation, and the sampler's
    empty remainder permutation). Batch ``p`` is computed from (seed, p) alone, so a resumed run
    starts at its checkpoint's position without re-reading the batches before it. Epochs drop their
    last partial batch unless the dataset is smaller than one batch.

    shard (rank, world): each global batch holds batch_size x world samples, the ones a single process
    with that batch size would draw; this process gets rows [rank * batch_size, (rank + 1) * batch_size).
    """

    def __init__(self, size: int, batch_size: int, seed: int, start: int = 0, shard: tuple[int, int] = (0, 1)):
        self.size, self.batch_size, self.seed, self.start = size, batch_size, seed, start
        self.rank, self.world = shard
        self.global_size = batch_size * self.world
        self.per_epoch = max(1, size // self.global_size)
        self._epoch, self._order, self._generator = -1, [], None

    def batch(self, position: int) -> list[int]:
        epoch, offset = divmod(position, self.per_epoch)
        if epoch < self._epoch or self._generator is None:  # replay the stream from the start
            self._epoch, self._generator = -1, torch.Generator().manual_seed(self.seed)
        while self._epoch < epoch:
            torch.empty((), dtype=torch.int64).random_(generator=self._generator)  # the loader's base seed
            self._order = torch.randperm(self.size, generator=self._generator).tolist()
            torch.randperm(self.size, generator=self._generator)  # RandomSampler's remainder permutation
            self._epoch += 1
        whole = self._order[offset * self.global_size : (offset + 1) * self.global_size]
        return whole[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def __iter__(self):
        position = self.start
        while True:
            yield self.batch(position)
            position += 1


def batches_forever(dataset: EncodedDataset, batch_size: int, pad_id: int, seed: int, num_workers: int = 0, start: int = 0,
                    shard: tuple[int, int] = (0, 1)):
    """Collated batches of ShuffledBatches from position ``start``. Encoding is deterministic, so
    the batches are the same whatever ``num_workers``; the loader gets its own generator, so
    creating it draws nothing from the global one that dropout uses."""
    if num_workers:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers are forked after tokenizing
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=ShuffledBatches(len(dataset), batch_size, seed, start, shard),
        collate_fn=functools.partial(collate, pad_id=pad_id),
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        worker_init_fn=_ignore_ctrl_c if num_workers else None,
        generator=torch.Generator().manual_seed(seed),
    )
    yield from loader


def _ignore_ctrl_c(worker_id: int) -> None:
    """Ctrl-C reaches the whole process group; the main process finishes its step and saves a
    checkpoint, which needs the workers alive until then."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


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

    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    handle = inner.get_output_embeddings().register_forward_pre_hook(answer_positions_only)
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


def accumulate_gradients(model: Any, family: Any, micro_batches: list[dict[str, Any]], device, dtype,
                         processes: Processes = Processes()) -> float:
    """Backward over the micro-batches of one optimizer step; returns the step's loss.

    The step's loss is the mean over ALL answer tokens of its micro-batches, not the mean of the
    per-micro-batch means: each micro-batch's sum is divided by the step's answer-token count before
    its backward. So batch_size 8 x grad_accum 1 and batch_size 2 x grad_accum 4 on the same data
    give the same gradient, whatever the answers' lengths (as transformers' Trainer does with
    num_items_in_batch). With several processes the count is the global batch's, and each loss is
    scaled by the number of processes, which DDP's gradient average divides out again: the gradient
    is that of one process running the whole global batch. The returned loss is the global one.
    """
    total_tokens = max(1, processes.sum(sum(answer_tokens(batch) for batch in micro_batches)))
    step_loss = 0.0
    for i, micro in enumerate(micro_batches):
        batch = to_device(micro, device, dtype)
        with processes.no_sync(model) if i < len(micro_batches) - 1 else contextlib.nullcontext():
            with autocast(device, dtype):
                loss_sum, _ = answer_token_loss(model, family, batch)
            loss = loss_sum / total_tokens
            (loss * processes.world).backward()
        step_loss += loss.item()
    return processes.sum(step_loss)


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for a bf16/fp16 backbone: the trainable parameters stay fp32 (master weights),
    so their matmuls with low-precision activations need autocast, on CPU (bf16) as on CUDA."""
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)


def train(recipe: Recipe, run_dir: Path, overwrite: bool = False, resume: bool = False) -> TrainResult:
    """Fine-tune per ``recipe`` and write the run directory described in the module docstring.

    resume: continue the unfinished run in ``run_dir`` from its newest checkpoint; ``recipe`` may
    differ from the one the run stored only in RESUMABLE_KEYS (else a UserError names the key).
    Under ``accelerate launch`` every process calls this; see edgetune.distributed.
    """
    method = get_method(recipe.method)
    method.check_family(detect_family(recipe.model)[0], recipe.method)  # before any work: can this family train and export it?
    train_samples = load_samples(recipe.data.train)
    eval_samples = load_samples(recipe.data.eval) if recipe.data.eval else []
    report = inspect_data(recipe)  # every entry against the model's processor, before any weights load
    report.raise_if_problems()
    for warning in report.warnings:
        console.print(f"[yellow]warning: {warning}")
    device = resolve_device(recipe.train.device)
    dtype = resolve_compute_dtype(recipe.train.precision, device)
    if recipe.train.optimizer == "paged_adamw_8bit" and device.type != "cuda":
        raise UserError("train.optimizer: paged_adamw_8bit needs a CUDA GPU; use adamw on CPU")
    processes = join_processes(device.type)
    device = process_device(processes, device)
    run_dir = Path(run_dir)
    existed, replaced, checkpoint = run_dir.exists(), None, None  # an empty folder of the user's stays if the run fails
    if processes.is_main:
        if resume:
            checkpoint = open_resumed_run(run_dir, recipe, processes.world)
        else:
            replaced = start_run_dir(run_dir, recipe, overwrite)
    processes.wait()
    if resume and not processes.is_main:
        checkpoint = load_latest_checkpoint(run_dir, clean=False)
    try:
        seed_everything(recipe.train.seed)
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
        cfg = recipe.train
        console.print(
            f"{backbone.family.name} | {method.name} | trainable parameters: {trainable:,} of {total:,} "
            f"({100 * trainable / total:.3f}%) | {device.type} {str(dtype).removeprefix('torch.')}"
            + (f" | {processes.world} processes: global batch {cfg.batch_size} x {cfg.grad_accum} x {processes.world} = "
               f"{cfg.batch_size * cfg.grad_accum * processes.world}" if processes.distributed else "")
            + (f" | resuming at step {checkpoint.step + 1} from {checkpoint.path}" if checkpoint else "")
        )
        if recipe.train.cache_image_features:  # the frozen tower runs once per image, then leaves memory
            from edgetune.image_cache import cache_image_features

            cache_image_features(model, backbone, train_samples + eval_samples, recipe.data.max_length, device, dtype)
        with PeakMemory(device.type) as memory:
            result = _loop(recipe, model, backbone, train_samples, eval_samples, run_dir, device, dtype, memory, checkpoint,
                           processes)
        summary = TrainResult(str(run_dir), backbone.family.name, method.name, trainable, total, **result,
                              resumed_from=checkpoint.step if checkpoint else None)
        if processes.is_main:
            finish_run(run_dir, model, method, summary)
        processes.wait()
    except BaseException as err:
        if not processes.is_main:  # the main process says what happened and cleans up
            raise
        saved = complete_checkpoints(run_dir)
        if not saved:
            if not resume:  # nothing to resume: leave what was there before
                shutil.rmtree(run_dir, ignore_errors=True)
                if replaced:
                    replaced.rename(run_dir)
                elif existed:
                    run_dir.mkdir()
            raise
        if replaced:
            shutil.rmtree(replaced, ignore_errors=True)
        hint = f"the run can continue from {saved[-1]}: edgetune train --resume {run_dir}"
        if processes.distributed:
            hint += f" --num-processes {processes.world}"
        if isinstance(err, KeyboardInterrupt) and not str(err):  # a second Ctrl-C mid-step, or a stopped process
            raise KeyboardInterrupt(f"interrupted; {hint}") from None
        if processes.distributed and lost_a_process(err):
            reason = " ".join(str(err).split())[:120]
            raise RuntimeError(f"a process of this run failed or was killed ({reason}); {hint}") from err
        if not isinstance(err, (KeyboardInterrupt, UserError)):  # those two say it themselves
            console.print(f"[yellow]{hint}")
        raise
    if replaced:
        shutil.rmtree(replaced, ignore_errors=True)
    return summary


def lost_a_process(err: BaseException) -> bool:
    """Whether ``err`` is a collective operation failing because a peer process went away."""
    text = str(err)
    return isinstance(err, (torch.distributed.DistError, ProcessesStopped)) or (
        isinstance(err, RuntimeError) and any(sign in text for sign in ("gloo", "NCCL", "Connection reset", "Connection closed")))


def start_run_dir(run_dir: Path, recipe: Recipe, overwrite: bool) -> Path | None:
    """Create a fresh run directory holding the resolved recipe. An earlier run it replaces
    (--overwrite) is moved aside, not deleted, and its new place returned: it comes back if the new
    run fails before its first checkpoint, as an atomic replacement would behave."""
    if not overwrite and (run_dir / "recipe.yaml").is_file() and not (run_dir / "run.json").exists():
        raise UserError(f"{run_dir} holds an unfinished run; continue it with `edgetune train --resume {run_dir}` "
                        "or start it again with --overwrite")
    check_output_dir(run_dir, overwrite)
    replaced = None
    if run_dir.exists() and any(run_dir.iterdir()):
        replaced = run_dir.with_name(f".{run_dir.name}.replaced-{os.getpid()}")
        run_dir.rename(replaced)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, run_dir / "recipe.yaml")
    (run_dir / "metrics.jsonl").touch()
    return replaced


def open_resumed_run(run_dir: Path, recipe: Recipe, processes: int = 1) -> Checkpoint | None:
    """Check that ``run_dir`` is an unfinished run that ``recipe`` may continue with ``processes``
    processes; store the recipe's allowed changes; return its newest checkpoint (None: the run died
    before its first). Another number of processes is allowed when the global batch (batch_size x
    processes) stays the same, so that each step sees the same samples."""
    stored_file = run_dir / "recipe.yaml"
    if not stored_file.is_file() or not (run_dir / "metrics.jsonl").is_file():
        raise UserError(f"--resume {run_dir}: not a run directory of edgetune train (no recipe.yaml and metrics.jsonl)")
    if (run_dir / "run.json").exists():
        raise UserError(f"--resume {run_dir}: this run is complete; start a new one (for more steps, a new --out)")
    import yaml

    stored = recipe_from_dict(yaml.safe_load(stored_file.read_text()), str(stored_file), run_dir)
    checkpoint = load_latest_checkpoint(run_dir)
    stored_processes = checkpoint.loop.get("processes", 1) if checkpoint else processes
    global_batch = stored.train.batch_size * stored_processes
    allowed = RESUMABLE_KEYS
    if processes != stored_processes:  # then train.batch_size must change so that the global batch does not
        if recipe.train.batch_size * processes != global_batch:
            fix = (f"set --set train.batch_size={global_batch // processes}" if global_batch % processes == 0
                   else f"it does not split over {processes} processes; use a number of processes that divides it")
            raise UserError(f"--resume {run_dir}: the run's global batch is {stored.train.batch_size} x {stored_processes} "
                            f"process(es) = {global_batch}, and {recipe.train.batch_size} x {processes} is not; {fix}")
        allowed = RESUMABLE_KEYS | {"train.batch_size"}
    refused = [(key, old, new) for key, old, new in changed_keys(stored, recipe) if key not in allowed]
    if refused:
        key, old, new = refused[0]
        raise UserError(f"--resume {run_dir}: {key} is {new!r} but the run was trained with {old!r}; a resumed run may "
                        f"change only {', '.join(sorted(RESUMABLE_KEYS))}")
    if checkpoint and checkpoint.step > recipe.train.max_steps:  # equal: killed while finishing, which resumes there
        raise UserError(f"--resume {run_dir}: the checkpoint is at step {checkpoint.step}, train.max_steps is {recipe.train.max_steps}")
    save_recipe(recipe, stored_file)
    return checkpoint


def finish_run(run_dir: Path, model: Any, method: Any, summary: TrainResult) -> None:
    """Write the final artifacts, each whole (run.json last: its presence says the run completed),
    then drop the checkpoints."""
    scratch = run_dir / ".adapter.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    method.save(model, scratch)
    shutil.rmtree(run_dir / "adapter", ignore_errors=True)
    scratch.rename(run_dir / "adapter")
    plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
    write_atomically(run_dir / "run.json", json.dumps(asdict(summary), indent=2))
    shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)


class CtrlC:
    """The first Ctrl-C asks the loop to stop after the current step (it then saves a checkpoint);
    a second one interrupts at once. Outside the main thread (no signals there) it never fires."""

    def __init__(self) -> None:
        self.requested = False

    def __enter__(self) -> "CtrlC":
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        console.print("[yellow]Ctrl-C: finishing this step, then saving a checkpoint (Ctrl-C again stops at once)")

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _loop(recipe, model, backbone, train_samples, eval_samples, run_dir: Path, device, dtype, memory: PeakMemory,
          checkpoint: Checkpoint | None, processes: Processes = Processes()) -> dict[str, Any]:
    cfg = recipe.train
    pad_id = backbone.processor.tokenizer.pad_token_id
    train_set = EncodedDataset(train_samples, backbone.processor, backbone.family, recipe.data.max_length)
    eval_set = EncodedDataset(eval_samples, backbone.processor, backbone.family, recipe.data.max_length)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(recipe, params, device)
    schedule = make_schedule(recipe, optimizer)
    # The loop's running totals: what a checkpoint stores beside the tensors.
    totals: dict[str, Any] = {"micro_batches": 0, "tokens": 0, "seconds": 0.0, "peak_memory_mb": 0.0,
                              "losses": [], "eval_loss": None, "skipped": [], "processes": processes.world}
    first_step = 1
    if checkpoint:
        restore_trainable(model, checkpoint.trainable, checkpoint.path)
        optimizer.load_state_dict(checkpoint.optimizer)
        schedule.load_state_dict(checkpoint.schedule)
        follow_recipe_lr(optimizer, schedule, cfg.lr)
        # Each process its own generators' state; with another number of processes than the run had
        # (allowed when the global batch is the same) the main process's, for every process.
        same = len(checkpoint.rng) == processes.world
        restore_rng(checkpoint.rng[processes.rank if same else 0])
        totals, first_step = checkpoint.loop | {"processes": processes.world}, checkpoint.step + 1
        if processes.is_main:
            keep_metrics_upto(run_dir / "metrics.jsonl", checkpoint.step)
    shard = (processes.rank, processes.world)
    positions = ShuffledBatches(len(train_set), cfg.batch_size * processes.world, cfg.seed)  # each global batch's samples
    batches = batches_forever(train_set, cfg.batch_size, pad_id, cfg.seed, resolve_num_workers(cfg.num_workers, device),
                              start=totals["micro_batches"], shard=shard)
    runner = processes.wrap(model)  # DDP around the model when there are processes to keep in sync

    def save(step: int, rng: dict[str, Any]) -> Path | None:
        rngs = processes.gather(rng)  # every process's generators: each draws its own dropout masks
        if not processes.is_main:
            return None
        return save_checkpoint(run_dir, step, model, optimizer, schedule, rngs, totals, cfg.keep_checkpoints)

    session_start = last_save = time.perf_counter()
    seconds_before = totals["seconds"]
    log_file = run_dir / "metrics.jsonl" if processes.is_main else os.devnull
    with open(log_file, "a") as log, step_progress("train") as progress, CtrlC() as ctrl_c:
        task = progress.add_task("train", total=cfg.max_steps, completed=first_step - 1, stats="")
        for step in range(first_step, cfg.max_steps + 1):
            step_start = time.perf_counter()
            rng_before = capture_rng()  # the generators' state after step - 1, for its checkpoint
            micro_batches = [next(batches) for _ in range(cfg.grad_accum)]
            step_loss = accumulate_gradients(runner, backbone.family, micro_batches, device, dtype, processes)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
            if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
                optimizer.zero_grad(set_to_none=True)
                ids = [train_samples[i].id for k in range(cfg.grad_accum) for i in positions.batch(totals["micro_batches"] + k)]
                if len(totals["skipped"]) >= cfg.skip_nonfinite:
                    if checkpoint and step == first_step:  # the state it resumed from already leads here
                        raise UserError(f"step {step}: {nonfinite_what(step_loss, grad_norm)} again right after resuming from "
                                        f"{checkpoint.path}: the steps before it already damaged the weights; start again "
                                        f"with --overwrite and a lower train.lr (now {cfg.lr:g})")
                    saved = save(step - 1, rng_before)
                    raise UserError(nonfinite_message(recipe, dtype, run_dir, step, step_loss, grad_norm, ids, saved))
                totals["skipped"].append({"step": step, "loss": repr(step_loss), "grad_norm": repr(grad_norm), "ids": ids})
                totals["micro_batches"] += cfg.grad_accum
                schedule.step()  # the step is spent without an update; the schedule stays on the step count
                log.write(json.dumps({"step": step, "skipped_nonfinite": totals["skipped"][-1]}) + "\n")
                console.print(f"[yellow]step {step}: loss {step_loss}, gradient norm {grad_norm}: skipped "
                              f"({len(totals['skipped'])} of train.skip_nonfinite={cfg.skip_nonfinite}); batch ids {ids}")
                progress.update(task, advance=1)
                continue
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            totals["micro_batches"] += cfg.grad_accum
            totals["losses"].append(step_loss)
            step_tokens = int(processes.sum(sum(int(batch["attention_mask"].sum()) for batch in micro_batches)))
            totals["tokens"] += step_tokens
            totals["seconds"] = seconds_before + time.perf_counter() - session_start
            totals["peak_memory_mb"] = max(totals["peak_memory_mb"], memory.mb)
            record = {"step": step, "loss": step_loss, "lr": schedule.get_last_lr()[0], "grad_norm": grad_norm,
                      "tokens": step_tokens, "step_s": time.perf_counter() - step_start,
                      "tokens_per_s": totals["tokens"] / totals["seconds"], "peak_mem_mb": totals["peak_memory_mb"]}
            log.write(json.dumps(record) + "\n")
            if eval_set and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps) and processes.is_main:
                totals["eval_loss"] = held_out_loss(model, eval_set, pad_id, cfg.batch_size, cfg.eval_samples, device, dtype)
                log.write(json.dumps({"step": step, "eval_loss": totals["eval_loss"]}) + "\n")
            log.flush()
            eval_loss = totals["eval_loss"]
            stats = f"loss {step_loss:.3f}" + (f" | eval {eval_loss:.3f}" if eval_loss is not None else "")
            stats += f" | {record['tokens_per_s']:.0f} tok/s | peak {record['peak_mem_mb']:.0f} MB"
            progress.update(task, advance=1, stats=stats)
            now = time.perf_counter()
            due = (cfg.save_every == "auto" and now - last_save >= AUTO_SAVE_SECONDS) or (
                cfg.save_every not in ("auto", 0) and step % cfg.save_every == 0)
            # Every process decides alike (a clock or a Ctrl-C may reach one process a step before another).
            interrupted = processes.sum(float(ctrl_c.requested)) > 0
            if processes.sum(float(due)) > 0 or interrupted or step == cfg.max_steps:  # the last: a crash while finishing resumes there
                path = save(step, capture_rng())
                last_save = time.perf_counter()
                if interrupted:
                    raise KeyboardInterrupt(f"interrupted after step {step}; checkpoint {path}; "
                                            f"continue with: edgetune train --resume {run_dir}")
    losses = totals["losses"] or [math.nan]
    return dict(
        steps=cfg.max_steps,
        first_loss=losses[0],
        final_loss=sum(losses[-5:]) / len(losses[-5:]),
        eval_loss=totals["eval_loss"],
        train_seconds=totals["seconds"],
        peak_memory_mb=totals["peak_memory_mb"],
        tokens_per_second=totals["tokens"] / max(totals["seconds"], 1e-9),
        skipped_steps=len(totals["skipped"]),
    )


AUTO_SAVE_SECONDS = 600  # train.save_every "auto": a checkpoint every 10 minutes


def nonfinite_what(loss: float, grad_norm: float) -> str:
    return f"loss {loss} is not finite" if not math.isfinite(loss) else f"gradient norm {grad_norm} is not finite (loss {loss:.4g})"


def nonfinite_message(recipe: Recipe, dtype: torch.dtype, run_dir: Path, step: int, loss: float, grad_norm: float,
                      ids: list[str], saved: Path) -> str:
    fixes = [f"lower train.lr (now {recipe.train.lr:g})"]
    if dtype != torch.float32:
        fixes.append("train.precision: fp32")
    fixes.append(f"check this step's data entries (ids {', '.join(ids)})")
    fixes.append("or skip such steps with train.skip_nonfinite: N")
    return (f"step {step}: {nonfinite_what(loss, grad_norm)}; stopped. The last good state (step {step - 1}) is in {saved}. "
            f"Likely fixes: {'; '.join(fixes)}. Then: edgetune train --resume {run_dir} --set train.lr=...")


def follow_recipe_lr(optimizer: torch.optim.Optimizer, schedule: Any, lr: float) -> None:
    """After loading a checkpoint: the schedule continues from its step with the recipe's train.lr
    (the same value as before unless the resume changed it)."""
    schedule.base_lrs = [lr for _ in optimizer.param_groups]
    for group, lr_lambda in zip(optimizer.param_groups, schedule.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * lr_lambda(schedule.last_epoch)
    schedule._last_lr = [group["lr"] for group in optimizer.param_groups]


def keep_metrics_upto(metrics_file: Path, step: int) -> None:
    """Drop the records a crashed run wrote after its checkpoint; the resumed run writes them again."""
    lines = [line for line in metrics_file.read_text().splitlines() if line.strip()]
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError):  # a line cut short by the crash
            break
    write_atomically(metrics_file, "".join(line + "\n" for line in kept))


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
