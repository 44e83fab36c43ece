"""Predict a recipe's peak memory and training time before any weights are downloaded (``edgetune plan``).

Inputs: the model's config.json (a local directory, or from the hub the config, processor and
tokenizer files only, never the weights), the recipe, and the training data (every entry, or a
deterministic sample of SAMPLE_LIMIT when there are more). The model is built on PyTorch's meta
device (shapes, no storage) and the recipe's PEFT method is attached to it as training attaches it,
so every parameter count is exact. Each sampled entry goes through the family's own
``encode_sample`` (processor, chat template, tokenizer) with a blank image of its images' sizes, so
sequence lengths, answer tokens and image tokens are the ones training sees. Without processor
files the families' image-token formulas and 4 characters a token stand in (the plan says so).

Memory model, in MiB, for the worst micro-batch: batch_size copies of the longest sampled entry,
its sequence capped at data.max_length. b = bytes of the compute dtype (2: bf16/fp16 on CUDA;
4: fp32, the CPU default; see edgetune.load.resolve_compute_dtype).

  quantized_weights   the LLM's linear layers as bitsandbytes stores them (edgetune.load: every
                      nn.Linear outside family.keep_precise()). NF4: 4 bits a weight + one absmax per
                      block of 64, 8-bit with double quantization (+ one fp32 per 256 blocks) =
                      4.127 bits, else fp32 = 4.5 bits. int8: 8 bits + one fp32 scale per output row.
                      quantization.mode none: b bytes.
  precise_weights     the rest of the model outside the vision tower, in the compute dtype: token
                      embeddings (once when tied to lm_head), norms, lm_head, the quantized layers'
                      biases, a frozen connector, and peft's frozen original of a trained connector.
  vision_tower        the frozen tower's weights (without the connector); 0 with
                      train.cache_image_features, which reads the tower's outputs from disk.
  vision_activations  the frozen tower runs without an autograd graph: its transient peak is one
                      layer's working set, (5 x width + 2 x intermediate) x b per patch of the
                      micro-batch, plus every layer's hidden states (depth + 1) x width x b per patch
                      when the family picks a middle layer (config.vision_feature_layer: LLaVA asks for
                      output_hidden_states), else input and output. Attention is assumed to be sdpa's
                      fused kernels (transformers' default), which never hold the heads x n x n scores.
  trainable_params    the method's tensors and a trained connector, fp32 master weights: 4 bytes each.
  gradients           fp32, one per trainable parameter: 4 bytes.
  optimizer_state     adamw: two fp32 moments, 8 bytes. paged_adamw_8bit: two 8-bit moments with one
                      fp32 absmax per 256 (2.03 bytes); bitsandbytes keeps tensors under 4096 elements
                      in 32 bit (8 bytes).
  activations         what autograd keeps in the decoder, T = batch x sequence tokens. A layer's full
                      activations per token: b x (5 x heads x head_dim [q, expanded k and v as sdpa
                      saves them, its output, o_proj's input] + 4 x intermediate [gate, up, act(gate),
                      their product]) + 2 x (4 + b) x hidden [two RMSNorms: the fp32 upcast and the
                      output] + (b + 1) x the input features of every linear LoRA adapts with dropout
                      (its dropped-out copy and mask). Gradient checkpointing (non-reentrant, per
                      decoder layer): layers x T x hidden x b (each layer's input) + one layer's full
                      activations, recomputed in backward; without it every layer's. Plus 3 x T x
                      hidden x b (input embeddings, final norm, the gradient coming back), 2 x T x
                      intermediate x b (the MLP's gradients in backward), the boolean attention mask
                      (batch x sequence^2 bytes), one quantized weight dequantized for its matmul,
                      a trained connector's inputs and outputs per image token, and with cached
                      image features the tower's outputs read for the micro-batch (width x b a patch).
  logits              only at the N answer positions (edgetune.train.answer_token_loss), never
                      [batch, sequence, vocab]: N x vocab x (b [lm_head's output] + 4 [its fp32 upcast]
                      + 4 [log-softmax output kept for backward]); backward swaps the upcast for an
                      fp32 gradient of the same size.
  overhead            CUDA: the context (CUDA_CONTEXT_MB) + allocator fragmentation (FRAGMENTATION x
                      the rest). CPU, where training measures anonymous resident memory (RssAnon): the
                      training process itself (CPU_PROCESS_MB) + FRAGMENTATION x the rest.

  peak = weights + trainable + gradients + optimizer state
         + max(vision_activations, activations + logits)   (the tower's are gone before the LLM runs)
         + overhead

Time model, per optimizer step = grad_accum micro-batches of the mean shape (batch_size samples
padded to the expected longest of batch_size random entries); T tokens, S padded length:
  forward     2 x P_llm x T (the decoder's linears) + 4 x layers x batch x S^2 x heads x head_dim
              (attention) + 2 x vocab x hidden x N (lm_head at answer positions) + 2 x P_method x T
              + 2 x P_connector x image tokens + the frozen vision tower, forward only:
              2 x P_vision x patches + 4 x depth x n^2 x width per tower sequence of n patches
              (0 with cached image features)
  backward    activation gradients through every frozen layer (its linears once more, attention
              twice, lm_head once), weight gradients only for the trainable parameters
              (2 x their forward; a trained connector's 1 x, its input needs no gradient)
  recompute   gradient checkpointing runs every decoder layer's forward once more
  seconds     FLOPs / (throughput x efficiency). Throughput: GPUS below, dense bf16 tensor TFLOPS
              with fp32 accumulate from the vendors' spec sheets (fp16 on cards without bf16; fp32
              recipes at half: TF32) x EFFICIENCY; --device cpu: this machine's matmul throughput from
              a short probe (measure_cpu_tflops) x CPU_EFFICIENCY.

The constants are first estimates, to be calibrated against measured runs: run.json's
peak_memory_mb is CUDA's max_memory_allocated (no context, no fragmentation) or the CPU's RssAnon,
so compare it with ``allocated_mb`` on CUDA and ``peak_memory_mb`` on CPU. Written by hand: no
library predicts a quantized VLM's fine-tuning step.
"""

from __future__ import annotations

import copy
import json
import math
import random
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgetune.errors import UserError
from edgetune.families import ModelFamily
from edgetune.families.base import get_module
from edgetune.recipe import ModelSection, Recipe

MB = 2**20


@dataclass(frozen=True)
class Gpu:
    vram_gb: float  # GiB, as marketed
    tflops: float  # dense tensor throughput in bf16 (fp16 where bf16 is missing), fp32 accumulate
    bf16: bool = True


# Spec sheets: NVIDIA's Ampere GA102 and Ada whitepapers (GeForce cards run fp32-accumulate at half
# their fp16-accumulate rate), the A4000/L4/T4/A100/H100/H200 datasheets (dense = half the sparse
# figure). The A10G has no public sheet: 70 is the figure commonly reported for AWS's G5.
GPUS: dict[str, Gpu] = {
    "rtx-3060-12gb": Gpu(12, 25.5),
    "rtx-3070": Gpu(8, 40.6),
    "rtx-3080-10gb": Gpu(10, 59.5),
    "rtx-3090": Gpu(24, 71.0),
    "rtx-4060-ti-16gb": Gpu(16, 44.1),
    "rtx-4070": Gpu(12, 58.3),
    "rtx-4080": Gpu(16, 97.5),
    "rtx-4090": Gpu(24, 165.2),
    "a4000": Gpu(16, 76.7),
    "a10g": Gpu(24, 70.0),
    "l4": Gpu(24, 121.0),
    "t4": Gpu(16, 65.0, bf16=False),
    "a100-40gb": Gpu(40, 312.0),
    "a100-80gb": Gpu(80, 312.0),
    "h100": Gpu(80, 989.0),  # SXM
    "h100-pcie": Gpu(80, 756.0),
    "h200": Gpu(141, 989.0),
}

# The share of peak throughput a QLoRA step reaches: every NF4 weight is dequantized before its
# matmul, adapters' matmuls are thin, norms, rotary and softmax run far below peak, and Python
# dispatches every op. A first estimate.
EFFICIENCY = 0.35
# The CPU probe measures achievable matmul throughput already; this is the step's share of it.
CPU_EFFICIENCY = 0.5
CUDA_CONTEXT_MB = 500  # the CUDA context and cuBLAS workspaces, outside torch's allocator
FRAGMENTATION = 0.10  # allocator slack on top of what the tensors take
CPU_PROCESS_MB = 310  # RssAnon of a CPU training process besides the model (tiny LLaVA: 311 MB)
SAMPLE_LIMIT = 200  # entries of the training data the plan encodes
NF4_BITS = {True: 4 + 8 / 64 + 32 / (64 * 256), False: 4 + 32 / 64}  # by double_quant
ADAM_8BIT_MIN_SIZE = 4096  # bitsandbytes' min_8bit_size: smaller tensors keep 32-bit state
# Files a plan reads from the hub: config, processor and tokenizer; never weights.
HUB_FILES = [
    "config.json", "preprocessor_config.json", "processor_config.json", "chat_template.json", "chat_template.jinja",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "tokenizer.model",
]

PART_LABELS = {
    "quantized_weights": "LLM linears",
    "precise_weights": "precise weights",
    "vision_tower": "vision tower",
    "vision_activations": "vision activations",
    "trainable_params": "trainable params",
    "gradients": "gradients",
    "optimizer_state": "optimizer state",
    "activations": "activations",
    "logits": "loss logits",
    "overhead": "framework overhead",
    "ddp_buckets": "DDP gradient buckets",
}


# ---- where the plan runs ----------------------------------------------------------------------


@dataclass
class Target:
    device: str  # "cuda" or "cpu"
    name: str
    budget_mb: float
    tflops: float  # peak in the compute dtype
    efficiency: float
    dtype: str  # "bf16", "fp16" or "fp32"
    note: str = ""

    @property
    def dtype_bytes(self) -> int:
        return 4 if self.dtype == "fp32" else 2


def measure_cpu_tflops(dtype: str = "fp32", seconds: float = 0.3, window: int = 4) -> float:
    """This machine's matmul throughput in TFLOPS: 1024 x 1024 products for ``seconds``, timed in
    windows of ``window`` products; the fastest window counts, so that another job that takes the
    cores for part of the probe does not make the plan slower (here a probe that ran beside a
    training job predicted a 31.5 s SmolVLM-256M step at 114 s; alone the probe reads 0.20-0.29)."""
    import torch

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a, b = torch.randn(1024, 1024, dtype=torch_dtype), torch.randn(1024, 1024, dtype=torch_dtype)
    a @ b  # warm-up
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        began = time.perf_counter()
        for _ in range(window):
            a @ b
        best = max(best, 2 * 1024**3 * window / (time.perf_counter() - began))
    return best / 1e12


def available_memory_mb() -> float:
    """MemAvailable: what this machine can give a new process now (Linux), else its total memory."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / MB


def resolve_target(recipe: Recipe, gpu: str | None, vram: float | None, device: str | None,
                   cpu_tflops: float | None = None) -> Target:
    """The device the plan predicts for: --gpu NAME (GPUS) and/or --vram GB, --device cpu (this
    machine), else the recipe's train.device, else the visible CUDA GPU, else this machine."""
    known = ", ".join(GPUS)
    if vram is not None and vram <= 0:
        raise UserError(f"--vram: expected the GPU's memory in GB, more than 0; got {vram:g}")
    if gpu is not None and gpu.lower() not in GPUS:
        raise UserError(f"--gpu {gpu}: unknown GPU; known: {known} (or give its memory with --vram GB)")
    if device is None:
        device = recipe.train.device if recipe.train.device != "auto" else None
    if device is None:
        device = "cuda" if gpu or vram or cuda_visible() else "cpu"
    if device not in ("cuda", "cpu"):
        raise UserError(f"--device: expected cuda or cpu, got {device}")
    if device == "cpu":
        if gpu or vram:
            raise UserError("--device cpu plans for this machine's memory and cores; drop --gpu/--vram, or use --device cuda")
        return cpu_target(recipe, cpu_tflops)
    return gpu_target(recipe, gpu.lower() if gpu else None, vram)


def cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def cpu_target(recipe: Recipe, cpu_tflops: float | None) -> Target:
    import os

    import torch

    from edgetune.load import resolve_compute_dtype

    dtype = {torch.float32: "fp32", torch.bfloat16: "bf16"}[resolve_compute_dtype(recipe.train.precision, torch.device("cpu"))]
    if recipe.train.optimizer == "paged_adamw_8bit":
        raise UserError(
            f"train.optimizer: paged_adamw_8bit needs a CUDA GPU, so this recipe cannot train on this machine; plan for a GPU "
            f"with --gpu NAME (known: {', '.join(GPUS)}) or --vram GB, or for this CPU with --set train.optimizer=adamw"
        )
    measured = cpu_tflops if cpu_tflops is not None else measure_cpu_tflops(dtype)
    return Target("cpu", f"this machine ({os.cpu_count()} cores)", available_memory_mb(), measured, CPU_EFFICIENCY, dtype,
                  note=f"{measured * 1000:.0f} GFLOPS {dtype} matmul measured here; budget: available RAM")


def gpu_target(recipe: Recipe, name: str | None, vram: float | None) -> Target:
    note = ""
    if name is None and vram is None:
        name, spec = local_gpu()
    elif name is None:
        name = min(GPUS, key=lambda key: (abs(GPUS[key].vram_gb - vram), GPUS[key].tflops))
        spec = GPUS[name]
        note = f"time at {name}'s throughput, the listed card closest in memory; name yours with --gpu"
        name = f"a {vram:g} GB GPU"
    else:
        spec = GPUS[name]
    precision = recipe.train.precision
    if precision == "bf16" and not spec.bf16:
        raise UserError(f"train.precision: {name} has no bf16; use fp16 or auto")
    dtype = {"auto": "bf16" if spec.bf16 else "fp16", "bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}[precision]
    tflops = spec.tflops / 2 if dtype == "fp32" else spec.tflops  # fp32 runs as TF32 at half the rate
    budget_gb = vram if vram is not None else spec.vram_gb
    return Target("cuda", name, budget_gb * 1024, tflops, EFFICIENCY, dtype, note)


def local_gpu() -> tuple[str, Gpu]:
    """The visible CUDA GPU: its memory, and its throughput from GPUS (the entry its name matches,
    else the entry closest in memory)."""
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"no CUDA GPU is visible here to plan for; name one with --gpu NAME (known: {', '.join(GPUS)}) or --vram GB")
    name = torch.cuda.get_device_name(0)
    memory_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
    listed = GPUS[listed_gpu(name, memory_gb) or min(GPUS, key=lambda key: abs(GPUS[key].vram_gb - memory_gb))]
    return name, Gpu(memory_gb, listed.tflops, listed.bf16)


def listed_gpu(device_name: str, memory_gb: float) -> str | None:
    """The GPUS entry whose name words (memory size aside) all appear in the device's name, e.g.
    "NVIDIA GeForce RTX 4060 Ti" -> rtx-4060-ti-16gb; the most specific one, then the closest in memory."""
    words = set(re.split(r"[\s_-]+", device_name.lower()))
    names = {key: {w for w in key.split("-") if not w.endswith("gb")} for key in GPUS}
    matches = [key for key, name in names.items() if name <= words]
    if not matches:
        return None
    return min(matches, key=lambda key: (-len(names[key]), abs(GPUS[key].vram_gb - memory_gb)))


# ---- the model, from its config alone ---------------------------------------------------------


def model_files(model: ModelSection) -> Path:
    """A directory with the model's config.json (and, when they exist, its processor and tokenizer
    files): model.path itself, or those files alone fetched from the hub."""
    local = Path(model.path)
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise UserError(f"model.path: {local} has no config.json; point it at a transformers model directory")
        return local
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model.path, allow_patterns=HUB_FILES))
    except Exception as err:  # offline, unknown repository, gated, ...: one line either way
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(
            f"model.path: cannot reach {model.path}'s config.json ({reason}); download it "
            f"(huggingface-cli download {model.path} config.json) or point model.path at a local directory"
        ) from None


@dataclass
class ModelShape:
    """Parameter counts of the model with the method attached (exact, from the meta device) and the
    dimensions the activations and FLOPs depend on."""

    llm_linear_params: int  # the weights bitsandbytes quantizes
    llm_linear_rows: int  # their output features (int8 keeps one scale per row)
    largest_linear: int  # the biggest one, dequantized whole for its matmul
    precise_params: int  # frozen, in the compute dtype, outside the vision tower
    vision_params: int  # the frozen vision tower without the connector
    trainable: list[int]  # elements of each trainable tensor
    connector_params: int
    connector_features: int  # in + out features of the connector's linears: activations per image token
    connector_trained: bool
    lora_dropout_features: int  # input features of one layer's linears that LoRA adapts with dropout
    layers: int
    hidden: int
    intermediate: int
    heads: int
    head_dim: int
    vocab: int
    vision_width: int
    vision_intermediate: int
    vision_depth: int
    vision_patch: int
    vision_keeps_hidden_states: bool

    @property
    def trainable_params(self) -> int:
        return sum(self.trainable)


def model_shape(family: ModelFamily, config: Any, recipe: Recipe) -> ModelShape:
    """Build the model on the meta device, attach the method as training does, count."""
    import torch

    from edgetune.methods import get_method

    method = get_method(recipe.method)
    method.check_family(family, recipe.method)
    skip = family.keep_precise()
    with torch.device("meta"):
        model = family.model_class()._from_config(config)
        model.requires_grad_(False)
        quantized = {}  # id(weight) -> linear, by edgetune.load's rule (transformers' replace_with_bnb_linear)
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and not any(f"{key}." in name or key == name.rsplit(".", 1)[-1] for key in skip):
                quantized[id(module.weight)] = module
        vision = {id(p) for p in get_module(model, family.vision_tower).parameters()}
        connector = get_module(model, family.connector)
        connector_ids = {id(p) for p in connector.parameters()}
        connector_linears = [m for m in connector.modules() if isinstance(m, torch.nn.Linear)]
        vocab = model.get_output_embeddings().weight.shape[0]
        model = method.attach(model, family, recipe.method)
    counts = {"linear": 0, "precise": 0, "vision": 0}
    trainable = []
    for param in model.parameters():  # each tensor once: tied embeddings count once
        if param.requires_grad:
            trainable.append(param.numel())
        elif id(param) in quantized:
            counts["linear"] += param.numel()
        elif id(param) in vision and id(param) not in connector_ids:
            counts["vision"] += param.numel()
        else:
            counts["precise"] += param.numel()
    text, vision_config = family.text_config(config), config.vision_config
    heads = text.num_attention_heads
    width = getattr(vision_config, "embed_dim", None) or vision_config.hidden_size  # Qwen2-VL: hidden_size is the merger's output
    return ModelShape(
        llm_linear_params=counts["linear"],
        llm_linear_rows=sum(m.out_features for m in quantized.values()),
        largest_linear=max((m.weight.numel() for m in quantized.values()), default=0),
        precise_params=counts["precise"],
        vision_params=counts["vision"],
        trainable=trainable,
        connector_params=sum(p.numel() for p in connector.parameters()),
        connector_features=sum(m.in_features + m.out_features for m in connector_linears),
        connector_trained=recipe.method.train_connector,
        lora_dropout_features=lora_dropout_features(model),
        layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        intermediate=text.intermediate_size,
        heads=heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        vocab=vocab,
        vision_width=width,
        vision_intermediate=getattr(vision_config, "intermediate_size", None) or int(width * vision_config.mlp_ratio),
        vision_depth=getattr(vision_config, "depth", None) or vision_config.num_hidden_layers,
        vision_patch=vision_config.patch_size,
        vision_keeps_hidden_states=hasattr(config, "vision_feature_layer"),
    )


def lora_dropout_features(model: Any) -> int:
    """The most input features any one decoder layer feeds to LoRA dropout (peft's lora_dropout)."""
    import torch

    per_layer: dict[str, int] = {}
    for name, module in model.named_modules():
        dropout = getattr(module, "lora_dropout", None)
        if isinstance(dropout, torch.nn.ModuleDict) and any(isinstance(d, torch.nn.Dropout) and d.p > 0 for d in dropout.values()):
            layer = re.search(r"layers\.(\d+)\.", name)
            key = layer.group(1) if layer else name
            per_layer[key] = per_layer.get(key, 0) + module.in_features
    return max(per_layer.values(), default=0)


# ---- the data, through the family's processor --------------------------------------------------


@dataclass
class SampleShape:
    seq: int  # tokens, image tokens included, before data.max_length
    answer: int  # tokens the loss is computed on
    image_tokens: int  # positions the image embeddings fill
    patches: list[int]  # the vision tower's sequences (crops, tiles, images) and their lengths


@dataclass
class DataShape:
    samples: list[SampleShape]
    total_entries: int
    exact: bool  # through the family's processor and tokenizer (else formulas)
    knob_values: dict[str, Any] = field(default_factory=dict)  # the processor's image settings in effect


def sample_entries(path: Path) -> tuple[list[Any], int]:
    """Every entry of the training data, or SAMPLE_LIMIT of them (fixed seed) when there are more."""
    from edgetune.data import _parse_entry, load_samples

    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        raw = None
    if not isinstance(raw, list) or len(raw) <= SAMPLE_LIMIT:
        samples = load_samples(path)  # checks every entry and raises the error training would
        return samples, len(samples)
    chosen = sorted(random.Random(0).sample(range(len(raw)), SAMPLE_LIMIT))
    return [_parse_entry(raw[i], i, Path(path)) for i in chosen], len(raw)


def data_shape(family: ModelFamily, config: Any, model_dir: Path, model: ModelSection, samples: list[Any], total: int,
               patch: int) -> DataShape:
    """Each sampled entry's shape through the family's processor (recipe settings applied), or
    through the formulas when there are no processor and tokenizer files."""
    try:
        processor = family.load_processor(str(model_dir), model.trust_remote_code)
    except Exception:  # no (or unreadable) processor and tokenizer files: the formulas instead
        return DataShape([formula_sample(config, model.processor, s) for s in samples], total, exact=False,
                         knob_values=dict(model.processor))
    family.configure_processor(processor, model.processor)  # a bad value is the UserError training would raise
    image_processor = processor.image_processor
    processor.image_processor = BlankImageMemo(image_processor)
    image_token = family.image_token_id(config)
    with tempfile.TemporaryDirectory() as scratch:
        shapes = [encoded_sample(family, processor, s, Path(scratch), image_token, patch) for s in samples]
    knob_values = {knob: knob_value(image_processor, knob) for knob in family.processor_knobs}
    return DataShape(shapes, total, exact=True, knob_values={k: v for k, v in knob_values.items() if v is not None})


class BlankImageMemo:
    """Stands in for a processor's image processor while the plan encodes entries with blank
    images: their tensors depend on the images' sizes alone, so each size is processed once."""

    def __init__(self, inner: Any):
        self.inner, self.outputs = inner, {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        images = kwargs["images"] if "images" in kwargs else args[0]
        sizes = tuple(image.size for image in flat_images(images))
        key = (sizes, repr(args[1:]), repr(sorted((k, v) for k, v in kwargs.items() if k != "images")))
        if key not in self.outputs:
            self.outputs[key] = self.inner(*args, **kwargs)
        return copy.copy(self.outputs[key])  # processors pop entries from it


def flat_images(images: Any) -> list[Any]:
    """One image, a list of them, or a list of lists (one per row) -> a flat list."""
    if not isinstance(images, (list, tuple)):
        return [images]
    return [image for item in images for image in flat_images(item)]


def encoded_sample(family: ModelFamily, processor: Any, sample: Any, scratch: Path, image_token: int, patch: int) -> SampleShape:
    """The entry as training encodes it, with blank images of its images' sizes."""
    from PIL import Image

    from edgetune.data import Sample
    from edgetune.train import answer_mask

    blanks = []
    for size in image_sizes(sample):
        blank = scratch / f"{size[0]}x{size[1]}.png"
        if not blank.exists():
            Image.new("RGB", size, (128, 128, 128)).save(blank)
        blanks.append(blank)
    encoded = family.encode_sample(processor, Sample(sample.id, blanks, sample.turns), max_length=2**31)
    ids, pixels = encoded["input_ids"], encoded["pixel_values"]
    if "image_grid_thw" in encoded:  # Qwen2-VL: [patches, dim], one tower sequence per image
        patches = [int(t * h * w) for t, h, w in encoded["image_grid_thw"].tolist()]
    else:  # [..., 3, H, W]: one tower sequence per crop or tile
        frames = pixels.numel() // math.prod(pixels.shape[-3:])
        patches = [(pixels.shape[-2] // patch) * (pixels.shape[-1] // patch)] * frames
    return SampleShape(len(ids), int(answer_mask(encoded["labels"]).sum()), int((ids == image_token).sum()), patches)


def image_sizes(sample: Any) -> list[tuple[int, int]]:
    """(width, height) of each image as training reads it (EXIF orientation applied), from headers."""
    from edgetune.data import image_size

    return [image_size(path) for path in sample.images]


def knob_value(image_processor: Any, knob: str) -> Any:
    """A processor setting's value in effect (model.processor.<knob>, else the checkpoint's)."""
    value = getattr(image_processor, knob, None)
    if value is None and isinstance(getattr(image_processor, "size", None), dict):
        value = image_processor.size.get(knob)
    if value is None and knob == "tile_size":
        value = image_processor.max_image_size.get("longest_edge")
    return value


def formula_sample(config: Any, knobs: dict[str, Any], sample: Any) -> SampleShape:
    """Without processor files: each family's image-token formula and 4 characters a token
    (+ 8 tokens of chat template a turn, + 1 end-of-turn token an answer)."""
    tokens, patches = 0, []
    for width, height in image_sizes(sample):
        image_tokens, sequences = formula_image(config, knobs, width, height)
        tokens, patches = tokens + image_tokens, patches + sequences
    text = sum(math.ceil(len(turn) / 4) + 8 for _, turn in sample.turns)
    answer = sum(math.ceil(len(turn) / 4) + 1 for role, turn in sample.turns if role == "assistant")
    return SampleShape(tokens + text, answer, tokens, patches)


def formula_image(config: Any, knobs: dict[str, Any], width: int, height: int) -> tuple[int, list[int]]:
    """(image tokens, the tower's sequence lengths) for one image of ``width`` x ``height``."""
    vision = config.vision_config
    patch = vision.patch_size
    if hasattr(vision, "spatial_merge_size"):  # Qwen2-VL: multiples of patch x merge within [min_pixels, max_pixels]
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        merge = vision.spatial_merge_size
        h, w = smart_resize(height, width, patch * merge, knobs.get("min_pixels", 56 * 56), knobs.get("max_pixels", 28 * 28 * 1280))
        return (h // patch) * (w // patch) // merge**2, [(h // patch) * (w // patch)]
    if hasattr(config, "scale_factor"):  # Idefics3 / SmolVLM: longest edge resized, tiles + a global tile
        tile = knobs.get("tile_size", vision.image_size)
        scale = knobs.get("longest_edge", 4 * tile) / max(width, height)
        grid = math.ceil(height * scale / tile) * math.ceil(width * scale / tile)
        frames = grid + 1 if knobs.get("do_image_splitting", True) and grid > 1 else 1
        per_tile = (tile // patch) ** 2
        return frames * per_tile // config.scale_factor**2, [per_tile] * frames
    side = vision.image_size // patch
    if hasattr(config, "image_grid_pinpoints"):  # LLaVA-NeXT: at most the largest pinpoint's crops + the base image
        pinpoints = knobs.get("image_grid_pinpoints", config.image_grid_pinpoints)
        crops = max(h * w for h, w in pinpoints) // vision.image_size**2 + 1
        return crops * side**2, [side**2] * crops
    return side**2, [side**2]  # LLaVA, PaliGemma: one fixed-size crop


# ---- the prediction ---------------------------------------------------------------------------


@dataclass
class Prediction:
    parts_mb: dict[str, float]
    allocated_mb: float  # without overhead: CUDA's max_memory_allocated
    peak_mb: float
    flops_per_step: float
    step_seconds: float
    worst_batch: dict[str, int]  # tokens, answer tokens, image tokens, patches of the worst micro-batch
    seq_mean: float  # after data.max_length
    seq_max: int
    padded_mean: float  # expected padded length of a micro-batch
    over_max_length: int  # sampled entries longer than data.max_length (training cuts them there)


def predict(shape: ModelShape, data: DataShape, recipe: Recipe, target: Target) -> Prediction:
    """Memory of the worst micro-batch and time of a mean step, per the module docstring."""
    b, train = target.dtype_bytes, recipe.train
    cached = train.cache_image_features
    samples, cap = data.samples, recipe.data.max_length
    seqs = [min(s.seq, cap) for s in samples]
    batch = train.batch_size
    seq = max(seqs)
    tokens = batch * seq
    answers = batch * max(s.answer for s in samples)
    image_tokens = batch * max(s.image_tokens for s in samples)
    patches = batch * max(sum(s.patches) for s in samples)

    mode = recipe.quantization.mode
    linear_bytes = {"nf4": NF4_BITS[recipe.quantization.double_quant] / 8, "int8": 1, "none": b}[mode]
    quantized = shape.llm_linear_params * linear_bytes + (4 * shape.llm_linear_rows if mode == "int8" else 0)
    optimizer = sum(n * (8 if train.optimizer == "adamw" or n < ADAM_8BIT_MIN_SIZE else 2 * (1 + 4 / 256))
                    for n in shape.trainable)
    # bytes a token keeps for backward in one decoder layer: attention, MLP, two RMSNorms, LoRA dropout
    layer = b * (5 * shape.heads * shape.head_dim + 4 * shape.intermediate) + 2 * (4 + b) * shape.hidden
    layer += (b + 1) * shape.lora_dropout_features
    if train.gradient_checkpointing:  # every layer's input, and one layer recomputed in full
        decoder = shape.layers * shape.hidden * b + layer
    else:
        decoder = shape.layers * layer
    around = 3 * shape.hidden * b + 2 * shape.intermediate * b  # embeddings, final norm, gradients in flight
    activations = tokens * (decoder + around) + batch * seq**2  # + the boolean attention mask
    activations += shape.largest_linear * b if mode != "none" else 0  # dequantized for its matmul
    activations += image_tokens * shape.connector_features * b if shape.connector_trained else 0
    activations += patches * shape.vision_width * b if cached else 0  # the tower's outputs, read from the cache
    held = (shape.vision_depth + 1 if shape.vision_keeps_hidden_states else 2) * shape.vision_width
    vision_activations = 0 if cached else patches * b * (5 * shape.vision_width + 2 * shape.vision_intermediate + held)
    parts = {
        "quantized_weights": quantized,
        "precise_weights": shape.precise_params * b,
        "vision_tower": 0 if cached else shape.vision_params * b,
        "vision_activations": vision_activations,
        "trainable_params": 4 * shape.trainable_params,
        "gradients": 4 * shape.trainable_params,
        "optimizer_state": optimizer,
        "activations": activations,
        "logits": answers * shape.vocab * (b + 8),
    }
    transient = {"vision_activations", "activations", "logits"}
    allocated = sum(v for k, v in parts.items() if k not in transient)
    allocated += max(parts["vision_activations"], parts["activations"] + parts["logits"])
    base = CUDA_CONTEXT_MB if target.device == "cuda" else CPU_PROCESS_MB
    parts["overhead"] = base * MB + FRAGMENTATION * allocated

    padded = expected_longest(seqs, batch)
    flops = train.grad_accum * micro_batch_flops(shape, data, recipe, padded)
    return Prediction(
        parts_mb={k: v / MB for k, v in parts.items()},
        allocated_mb=allocated / MB,
        peak_mb=(allocated + parts["overhead"]) / MB,
        flops_per_step=flops,
        step_seconds=flops / (target.tflops * 1e12 * target.efficiency),
        worst_batch={"tokens": tokens, "answer_tokens": answers, "image_tokens": image_tokens, "patches": patches},
        seq_mean=sum(seqs) / len(seqs),
        seq_max=seq,
        padded_mean=padded,
        over_max_length=sum(s.seq > cap for s in samples),
    )


def expected_longest(lengths: list[int], batch: int) -> float:
    """The expected longest of ``batch`` entries drawn at random: the padded length of a micro-batch."""
    ordered, n = sorted(lengths), len(lengths)
    return sum(length * ((k / n) ** batch - ((k - 1) / n) ** batch) for k, length in enumerate(ordered, start=1))


def micro_batch_flops(shape: ModelShape, data: DataShape, recipe: Recipe, padded: float) -> float:
    """FLOPs of one micro-batch of the mean shape: forward, backward and recomputation."""
    batch, samples = recipe.train.batch_size, data.samples

    def per_batch(value: Callable[[SampleShape], float]) -> float:
        return batch * sum(value(s) for s in samples) / len(samples)

    tokens = batch * padded
    trained_llm = max(0, shape.trainable_params - (shape.connector_params if shape.connector_trained else 0))
    linears = 2 * shape.llm_linear_params * tokens
    attention = 4 * shape.layers * batch * padded**2 * shape.heads * shape.head_dim
    method = 2 * trained_llm * tokens
    head = 2 * shape.vocab * shape.hidden * per_batch(lambda s: s.answer)
    connector = 2 * shape.connector_params * per_batch(lambda s: s.image_tokens)
    vision = 0.0
    if not recipe.train.cache_image_features:
        vision = per_batch(lambda s: 2 * shape.vision_params * sum(s.patches)
                           + 4 * shape.vision_depth * shape.vision_width * sum(n * n for n in s.patches))
    forward = linears + attention + method + head + connector + vision
    backward = linears + 2 * attention + 2 * method + head + (connector if shape.connector_trained else 0)
    recompute = linears + attention + method if recipe.train.gradient_checkpointing else 0
    return forward + backward + recompute


# ---- what to turn when it does not fit --------------------------------------------------------


@dataclass
class Knob:
    setting: str
    change: str
    peak_mb: float
    saves_mb: float


@dataclass
class Change:
    """One recipe change that lowers memory: what to set, and how to apply it to a copy."""

    setting: str
    change: str
    apply: Callable[[Recipe], None]
    reencode: bool = False  # the data must go through the processor again (image settings)


def cheaper_settings(recipe: Recipe, data: DataShape, target: Target, vision_params: int) -> list[Change]:
    """The changes that may lower the recipe's peak: batch, checkpointing, optimizer, image cache,
    the family's image settings, max_length."""
    train, changes = recipe.train, []

    def set_value(section: str, key: str, value: Any) -> Callable[[Recipe], None]:
        return lambda r: setattr(getattr(r, section), key, value)

    if train.batch_size > 1:
        half, accum = train.batch_size // 2, train.grad_accum * 2

        def halve_batch(r: Recipe) -> None:  # the same samples a step: grad_accum makes up for it
            r.train.batch_size, r.train.grad_accum = half, accum

        changes.append(Change("train.batch_size", f"{train.batch_size} -> {half} (grad_accum {train.grad_accum} -> {accum})", halve_batch))
    if not train.gradient_checkpointing:
        changes.append(Change("train.gradient_checkpointing", "false -> true", set_value("train", "gradient_checkpointing", True)))
    if train.optimizer == "adamw" and target.device == "cuda":
        changes.append(Change("train.optimizer", "adamw -> paged_adamw_8bit", set_value("train", "optimizer", "paged_adamw_8bit")))
    if not train.cache_image_features and vision_params:
        changes.append(Change("train.cache_image_features", "false -> true (the tower runs once per image, first)",
                              set_value("train", "cache_image_features", True)))
    for knob, value in data.knob_values.items():
        smaller = smaller_image_setting(knob, value, data.knob_values)
        if smaller is not None:
            settings = {**recipe.model.processor, knob: smaller}
            changes.append(Change(f"model.processor.{knob}", f"{value} -> {smaller}", set_value("model", "processor", settings), reencode=True))
    lengths = sorted(s.seq for s in data.samples)
    shorter = lengths[int(0.9 * (len(lengths) - 1))]
    if shorter < min(lengths[-1], recipe.data.max_length):
        changes.append(Change("data.max_length", f"{recipe.data.max_length} -> {shorter} (training cuts the 10% longest entries "
                              "there; `edgetune data check` lists answers cut entirely)", set_value("data", "max_length", shorter)))
    return changes


def smaller_image_setting(knob: str, value: Any, values: dict[str, Any]) -> Any:
    """The image setting that about halves the image tokens, or None if there is none smaller."""
    if knob == "max_pixels":
        smaller = value // 2
        return smaller if smaller >= values.get("min_pixels", 0) else None
    if knob == "longest_edge":
        tile = values.get("tile_size") or 1
        smaller = max(tile, value // 2 // tile * tile)
        return smaller if smaller < value else None
    if knob == "do_image_splitting":
        return False if value else None
    if knob == "image_grid_pinpoints":
        fewest = min(h * w for h, w in value)
        smaller = [list(p) for p in value if p[0] * p[1] == fewest]
        return smaller if len(smaller) < len(value) else None
    return None


# ---- the whole plan ---------------------------------------------------------------------------


@dataclass
class Plan:
    name: str
    recipe: Recipe
    family: str
    target: Target
    shape: ModelShape
    data: DataShape
    prediction: Prediction
    knobs: list[Knob]
    notes: list[str]
    gpus: int = 1  # data-parallel processes, one per GPU; the memory is per GPU

    @property
    def fits(self) -> bool:
        return self.prediction.peak_mb <= self.target.budget_mb

    @property
    def image_tokens_per_sample(self) -> float:
        return sum(s.image_tokens for s in self.data.samples) / len(self.data.samples)

    @property
    def tokens_per_step(self) -> float:
        """Tokens an optimizer step trains on, padding excluded (what training logs as "tokens"), all GPUs."""
        return self.recipe.train.batch_size * self.recipe.train.grad_accum * self.gpus * self.prediction.seq_mean

    @property
    def run_seconds(self) -> float:
        return self.prediction.step_seconds * self.recipe.train.max_steps

    def to_json(self) -> dict[str, Any]:
        p, data, shape = self.prediction, self.data, self.shape
        return {
            "recipe": self.name,
            "family": self.family,
            "method": self.recipe.method.name,
            "device": self.target.device,
            "target": self.target.name,
            "dtype": self.target.dtype,
            "budget_mb": round(self.target.budget_mb, 1),
            "gpus": self.gpus,
            "peak_memory_mb": round(p.peak_mb, 3),
            "allocated_mb": round(p.allocated_mb, 3),
            "fits": self.fits,
            "parts": {k: round(v, 3) for k, v in p.parts_mb.items()},
            "image_tokens_per_sample": round(self.image_tokens_per_sample, 1),
            "image_tokens_per_sample_max": max(s.image_tokens for s in data.samples),
            "seq_len": {"mean": round(p.seq_mean, 1), "max": p.seq_max, "max_length": self.recipe.data.max_length},
            "answer_tokens_per_sample": round(sum(s.answer for s in data.samples) / len(data.samples), 1),
            "tokens_per_step": round(self.tokens_per_step),
            "worst_micro_batch": p.worst_batch,
            "flops_per_step": p.flops_per_step,
            "tflops": self.target.tflops,
            "efficiency": self.target.efficiency,
            "step_seconds": p.step_seconds,
            "run_seconds": self.run_seconds,
            "max_steps": self.recipe.train.max_steps,
            "params": {"quantized": shape.llm_linear_params, "precise": shape.precise_params,
                       "vision_tower": shape.vision_params, "trainable": shape.trainable_params},
            "samples": {"planned": len(data.samples), "entries": data.total_entries,
                        "over_max_length": p.over_max_length, "exact": data.exact},
            "knobs": [vars(k) for k in self.knobs],
            "notes": self.notes,
        }


def plan_recipe(recipe: Recipe, name: str = "recipe", gpu: str | None = None, vram: float | None = None,
                device: str | None = None, cpu_tflops: float | None = None, gpus: int = 1) -> Plan:
    """Predict ``recipe``'s peak memory, time and fit on the target (see resolve_target); reads
    config, processor and tokenizer files and the training data, never weights.

    gpus: data-parallel processes (edgetune.distributed), each with train.batch_size samples: every
    GPU holds what one would plus DDP's gradient buckets (a second fp32 copy of the trainable
    parameters' gradients); a step takes about one GPU's step time and trains gpus x the tokens.
    """
    from edgetune.load import detect_family

    if gpus < 1:
        raise UserError(f"--gpus {gpus}: give at least 1")
    target = resolve_target(recipe, gpu, vram, device, cpu_tflops)
    model_dir = model_files(recipe.model)
    family, config = detect_family(recipe.model.model_copy(update={"path": str(model_dir)}))
    shape = model_shape(family, config, recipe)
    samples, total = sample_entries(recipe.data.train)

    def measure(changed: Recipe) -> DataShape:
        return data_shape(family, config, model_dir, changed.model, samples, total, shape.vision_patch)

    data = measure(recipe)

    def predict_per_gpu(changed: Recipe, changed_data: DataShape) -> Prediction:
        prediction = predict(shape, changed_data, changed, target)
        if gpus == 1:
            return prediction
        buckets = shape.trainable_params * 4 / MB
        return replace(prediction, parts_mb=prediction.parts_mb | {"ddp_buckets": buckets},
                       allocated_mb=prediction.allocated_mb + buckets, peak_mb=prediction.peak_mb + buckets)

    prediction = predict_per_gpu(recipe, data)
    knobs = (turned_knobs(recipe, data, target, shape, prediction, measure, predict_per_gpu)
             if prediction.peak_mb > target.budget_mb else [])
    notes = plan_notes(recipe, data, prediction, target)
    if gpus > 1:
        notes.append(f"{gpus} GPUs, data-parallel (DDP): memory per GPU; a step trains a global batch of "
                     f"{recipe.train.batch_size} x {recipe.train.grad_accum} x {gpus}; FSDP is not supported yet")
    return Plan(name, recipe, family.name, target, shape, data, prediction, knobs, notes, gpus)


def turned_knobs(recipe: Recipe, data: DataShape, target: Target, shape: ModelShape, prediction: Prediction,
                 measure: Callable[[Recipe], DataShape], predict_per_gpu: Callable[[Recipe, DataShape], Prediction]) -> list[Knob]:
    """Each cheaper setting alone with its predicted peak, best first; all of them together when
    none suffices alone."""

    def peak_with(changes: list[Change]) -> float:
        changed = recipe.model_copy(deep=True)
        for change in changes:
            change.apply(changed)
        changed_data = measure(changed) if any(change.reencode for change in changes) else data
        return predict_per_gpu(changed, changed_data).peak_mb

    helpful = [(change, peak) for change in cheaper_settings(recipe, data, target, shape.vision_params)
               if (peak := peak_with([change])) < prediction.peak_mb]
    knobs = sorted((Knob(change.setting, change.change, peak, prediction.peak_mb - peak) for change, peak in helpful),
                   key=lambda knob: knob.peak_mb)
    if len(knobs) > 1 and knobs[0].peak_mb > target.budget_mb:
        together = peak_with([change for change, _ in helpful])
        knobs.append(Knob("all of the above", "together", together, prediction.peak_mb - together))
    return knobs


def plan_notes(recipe: Recipe, data: DataShape, prediction: Prediction, target: Target) -> list[str]:
    notes = []
    if prediction.over_max_length:
        longest = max(s.seq for s in data.samples)
        notes.append(
            f"{prediction.over_max_length} of {len(data.samples)} planned entries exceed data.max_length={recipe.data.max_length} "
            f"(longest: {longest} tokens): training cuts them there (`edgetune data check` lists whose answers it cuts); "
            "raise data.max_length or shrink the images to keep them whole (this plan caps them at max_length)"
        )
    if data.total_entries > len(data.samples):
        notes.append(f"data: {len(data.samples)} of {data.total_entries} entries planned (a fixed-seed sample)")
    if not data.exact:
        notes.append("no processor or tokenizer files beside config.json: image tokens from the family's formula, text at 4 characters a token")
    if target.note:
        notes.append(target.note)
    if target.device == "cuda" and recipe.train.optimizer == "paged_adamw_8bit":
        notes.append("paged_adamw_8bit's state is counted on the GPU; bitsandbytes pages it to CPU RAM when the GPU runs out")
    if recipe.train.cache_image_features:
        notes.append("cached image features: the tower runs once per image before training, not counted in the time")
    return notes


# ---- output -----------------------------------------------------------------------------------


def part_descriptions(plan: Plan) -> dict[str, str]:
    shape, recipe, dtype, worst = plan.shape, plan.recipe, plan.target.dtype, plan.prediction.worst_batch
    cached = recipe.train.cache_image_features
    quant = recipe.quantization
    stored = {"nf4": "NF4" + (" + double quant" if quant.double_quant else ""), "int8": "int8", "none": f"{dtype}, not quantized"}
    optimizer = {"adamw": "adamw: 2 fp32 moments", "paged_adamw_8bit": "paged_adamw_8bit: 2 8-bit moments"}
    return {
        "quantized_weights": f"{millions(shape.llm_linear_params)} params, {stored[quant.mode]}",
        "precise_weights": f"{millions(shape.precise_params)} in {dtype}: embeddings, norms, lm_head",
        "vision_tower": "not loaded: cached image features" if cached else f"{millions(shape.vision_params)} in {dtype}",
        "vision_activations": "none: cached image features" if cached else f"{worst['patches']:,} patches, no graph; transient",
        "trainable_params": f"{shape.trainable_params:,} in fp32 ({recipe.method.name}" + (" + connector)" if shape.connector_trained else ")"),
        "gradients": "fp32",
        "optimizer_state": optimizer[recipe.train.optimizer],
        "activations": f"{worst['tokens']:,} tokens" + (", checkpointed" if recipe.train.gradient_checkpointing else ", no checkpointing"),
        "logits": f"{worst['answer_tokens']:,} answer tokens x {shape.vocab:,}",
        "overhead": "CUDA context + fragmentation" if plan.target.device == "cuda" else "the process + fragmentation",
        "ddp_buckets": f"fp32 copy of the gradients DDP all-reduces across {plan.gpus} GPUs",
    }


def millions(n: int) -> str:
    return f"{n / 1e6:,.1f}M" if n >= 1e5 else f"{n:,}"


def mib(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 10 else f"{value:.2f}"


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes = seconds / 60
    return f"{minutes:.0f} min" if minutes < 120 else f"{minutes / 60:.1f} h"


def print_plan(plan: Plan, console: Any) -> None:
    """The plan as rich tables: memory by part, shapes and time, then knobs when it does not fit."""
    from rich.table import Table

    p, target, train = plan.prediction, plan.target, plan.recipe.train
    title = f"{plan.name}: {plan.family}, {plan.recipe.method.name}, on {target.name} ({target.dtype})"
    memory = Table(title=title, title_justify="left")
    memory.add_column("part")
    memory.add_column("MiB", justify="right")
    memory.add_column("what")
    descriptions = part_descriptions(plan)
    for name, mb in p.parts_mb.items():
        memory.add_row(PART_LABELS[name], mib(mb), descriptions[name])
    memory.add_section()
    memory.add_row("[bold]peak", f"[bold]{p.peak_mb:,.0f}", "vision and LLM activations never coexist: the larger counts")
    memory.add_row("budget", f"{target.budget_mb:,.0f}", "GPU memory" if target.device == "cuda" else "available RAM")
    memory.add_row("fits", "[green]yes" if plan.fits else "[red]no", f"{target.budget_mb - p.peak_mb:+,.0f} MiB headroom")
    console.print(memory)

    shapes = Table(show_header=False, box=None, padding=(0, 2))
    max_image_tokens = max(s.image_tokens for s in plan.data.samples)
    shapes.add_row("image tokens per sample", f"{plan.image_tokens_per_sample:,.1f} mean, {max_image_tokens:,} max")
    shapes.add_row("sequence length", f"{p.seq_mean:,.1f} mean, {p.seq_max:,} max (data.max_length {plan.recipe.data.max_length:,})")
    per = f"batch {train.batch_size} x grad_accum {train.grad_accum}" + (f" x {plan.gpus} GPUs" if plan.gpus > 1 else "")
    shapes.add_row("tokens per step", f"{plan.tokens_per_step:,.0f} ({per})")
    shapes.add_row("FLOPs per step", f"{p.flops_per_step:.3g} at {target.tflops:.3g} TFLOPS x efficiency {target.efficiency:g}")
    shapes.add_row("time per step", duration(p.step_seconds))
    shapes.add_row(f"time for {train.max_steps:,} steps", duration(plan.run_seconds))
    console.print(shapes)

    if plan.knobs:
        knobs = Table(title="does not fit: knobs to turn (each alone)", title_justify="left")
        knobs.add_column("setting", no_wrap=True, min_width=max(len(knob.setting) for knob in plan.knobs))
        knobs.add_column("change")
        knobs.add_column("peak MiB", justify="right", no_wrap=True)
        knobs.add_column("saves MiB", justify="right", no_wrap=True)
        for knob in plan.knobs:
            fits = "[green]" if knob.peak_mb <= target.budget_mb else ""
            knobs.add_row(knob.setting, knob.change, f"{fits}{mib(knob.peak_mb)}", mib(knob.saves_mb))
        console.print(knobs)
    for note in plan.notes:
        console.print(f"note: {note}")
