"""Load the frozen backbone: the LLM's linear layers quantized (bitsandbytes NF4 by default),
the vision tower, connector, embeddings, norms and lm_head kept in the compute dtype."""

from __future__ import annotations

import ctypes
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgetune.errors import UserError
from edgetune.families import FAMILIES, ModelFamily
from edgetune.recipe import ModelSection, QuantizationSection

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")  # torch.load formats, which can run code when read


@dataclass
class Backbone:
    model: Any  # a transformers *ForConditionalGeneration
    processor: Any
    family: ModelFamily


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device: cuda was asked for but no CUDA GPU is visible; use auto or cpu")
    return torch.device(device)


def resolve_compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU (bf16 matmuls there are slow and lossy); bf16 on CUDA where supported, else fp16."""
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and precision == "fp16":
        raise UserError("train.precision: fp16 needs a CUDA GPU; use fp32 (or auto) on CPU")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def detect_family(model: ModelSection) -> tuple[ModelFamily, Any]:
    """The model's family and transformers config, from config files alone (no weights are read)."""
    from transformers import AutoConfig

    if Path(model.path).is_dir():
        check_model_config(Path(model.path))
    try:
        config = AutoConfig.from_pretrained(model.path, trust_remote_code=model.trust_remote_code)
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise UserError(
                f"model.path: {model.path} needs custom code from its repository; edgetune does not run it "
                "unless you set model.trust_remote_code: true"
            ) from None
        raise UserError(f"model.path: {model.path}: {str(err).splitlines()[0]}") from None
    except OSError as err:
        raise UserError(f"model.path: cannot load {model.path} ({str(err).splitlines()[0]}); use a local model directory or a reachable hub id") from None
    if config.model_type not in FAMILIES:
        raise UserError(
            f"model.path: {model.path} is a '{config.model_type}' model, which edgetune does not support; "
            f"supported families: {', '.join(sorted(FAMILIES))}"
        )
    family = FAMILIES[config.model_type]
    for knob in model.processor:
        if knob not in family.processor_knobs:
            offered = ", ".join(f"{k} ({what})" for k, what in family.processor_knobs.items()) or "none"
            raise UserError(f"model.processor.{knob}: the '{family.name}' family has no such setting; its settings: {offered}")
    return family, config


def check_model_config(model_dir: Path, where: str = "model.path") -> None:
    """A local model directory's config.json: valid JSON with a model_type edgetune has a family for.

    A config whose auto_map names custom code is refused only when its model_type is not one of
    edgetune's families: for those, transformers loads its own implementation and runs no custom code.
    """
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise UserError(f"{where}: {model_dir} has no config.json; point it at a transformers model directory")
    try:
        config = json.loads(config_file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{where}: {config_file} is not valid JSON ({err}); fix it or download the model again") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str):
        raise UserError(f"{where}: {config_file} has no model_type, so it is not a transformers model config; "
                        "download the model again")
    if model_type not in FAMILIES:
        if config.get("auto_map"):
            raise UserError(f"{where}: {model_dir} is a '{model_type}' model that needs custom code from its repository "
                            "(auto_map in config.json), which edgetune does not run, model.trust_remote_code or not; "
                            f"supported families: {', '.join(sorted(FAMILIES))}")
        raise UserError(f"{where}: {model_dir} is a '{model_type}' model, which edgetune does not support; "
                        f"supported families: {', '.join(sorted(FAMILIES))}")


def check_model_weights(model_dir: Path, where: str = "model.path") -> list[Path]:
    """The safetensors files of a local model directory, each with a readable header; returns them.

    UserError when there are none (none at all, or only pickles, which edgetune never loads), when a
    shard named in model.safetensors.index.json is missing, or when a file is truncated or corrupt.
    ``where`` starts each message: the recipe key, or the command's argument.
    """
    from safetensors import safe_open

    index_file = model_dir / SAFETENSORS_INDEX
    if index_file.is_file():
        try:
            shards = sorted({model_dir / name for name in json.loads(index_file.read_text())["weight_map"].values()})
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise UserError(f"{where}: {index_file} is not a safetensors index ({err!r}); download the model again") from None
    else:
        shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        pickles = sorted(path.name for pattern in PICKLE_WEIGHTS for path in model_dir.glob(pattern))
        if pickles:
            raise UserError(
                f"{where}: {model_dir} has only pickle weights ({pickles[0]}), which edgetune never loads (a pickle can "
                "run code); download the model's .safetensors files, or convert (save_pretrained(dir, safe_serialization=True))"
            )
        raise UserError(f"{where}: {model_dir} has a config.json but no *.safetensors weights; "
                        "download the weights too, or point at the complete model directory")
    for shard in shards:
        if not shard.is_file():
            raise UserError(f"{where}: {shard} is missing (named in {SAFETENSORS_INDEX}); download the model again")
        try:
            with safe_open(str(shard), framework="numpy"):
                pass  # reads and checks the header: every tensor's bytes must lie within the file
        except Exception as err:  # safetensors raises its own error type
            raise UserError(f"{where}: {shard} is truncated or not a safetensors file ({err}); download it again") from None
    return shards


def quantization_config(quant: QuantizationSection, family: ModelFamily, compute_dtype: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    if quant.mode == "none":
        return None
    skip = family.keep_precise()
    if quant.mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=torch.uint8,
        llm_int8_skip_modules=skip,
    )


def load_processor(path: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoProcessor, AutoTokenizer

    try:
        # The slow image processors are the reference the torch-free runtime reproduces exactly.
        processor = AutoProcessor.from_pretrained(path, use_fast=False, trust_remote_code=trust_remote_code)
        if not processor.tokenizer.is_fast:
            # use_fast=False reaches the tokenizer too where a slow class exists (SmolVLM's GPT2Tokenizer);
            # the bundle ships the fast tokenizer's tokenizer.json, so train and export with that one.
            processor.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except PROCESSOR_ERRORS as err:
        raise processor_error(path, err) from None
    return processor


PROCESSOR_ERRORS = (OSError, ValueError, ImportError, TypeError)  # what transformers raises for missing or bad files


def processor_error(path: str, err: Exception, where: str | None = None) -> UserError:
    """transformers' refusal to load a processor, on one line naming the model directory."""
    reason = " ".join(str(err).split()).split(". ")[0] or type(err).__name__  # transformers' first sentence
    return UserError(f"{where + ': ' if where else ''}cannot load the tokenizer and image processor of {path} ({reason}); "
                     "the directory needs the model's tokenizer and preprocessor files")


def load_backbone(
    model: ModelSection,
    quant: QuantizationSection,
    device: torch.device,
    compute_dtype: torch.dtype,
) -> Backbone:
    """The frozen model with every parameter's requires_grad off, in eval mode."""
    family, _ = detect_family(model)
    if Path(model.path).is_dir():
        check_model_weights(Path(model.path))
    processor = load_model_processor(family, model)  # before the weights: a missing tokenizer fails fast
    if device.type == "cpu":
        return_freed_memory_promptly()
    kwargs: dict[str, Any] = dict(
        dtype=compute_dtype,
        device_map={"": device.index or 0} if device.type == "cuda" else {"": "cpu"},
        trust_remote_code=model.trust_remote_code,
        use_safetensors=True,  # never a pickle, from a local directory or the hub
    )
    qconfig = quantization_config(quant, family, compute_dtype)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    hf_model = family.model_class().from_pretrained(model.path, **kwargs)
    keep_4bit_layout_trainable(hf_model)
    release_checkpoint_files(hf_model)
    hf_model.requires_grad_(False)
    hf_model.eval()
    family.configure_model(hf_model, model.processor)
    return Backbone(hf_model, processor, family)


def load_model_processor(family: ModelFamily, model: ModelSection) -> Any:
    """The family's processor for ``model``, configured by model.processor; UserError if it cannot load."""
    try:
        processor = family.load_processor(model.path, model.trust_remote_code)
    except PROCESSOR_ERRORS as err:  # a family that assembles its processor itself (Qwen2-VL, PaliGemma, ...)
        raise processor_error(model.path, err, where="model.path") from None
    family.configure_processor(processor, model.processor)
    return processor


def return_freed_memory_promptly(threshold: int = 1 << 20) -> bool:
    """glibc only: serve every allocation of ``threshold`` bytes (1 MiB) or more with its own mmap,
    which goes back to the system when the tensor is freed; returns whether it was set.

    glibc's default threshold is dynamic: once a large block is freed it rises (up to 32 MiB), and
    from then on tensors come from its heap, where freed blocks stay resident: in the first forward
    of a training step each checkpointed decoder layer's input pins the blocks around it, and the
    heap grows by ~53 MB a layer. Measured at the SmolVLM-256M shape (1,024 tokens, fp32, NF4,
    checkpointing; 2 cores, one run after another, 2026-12-01): anonymous peak 1.9 GB at 37-42 s a
    step with this, 3.2-3.3 GB at 29-30 s with glibc's default; fixed 2/4/8/32 MiB thresholds gave
    1.9/2.6/3.2/2.8 GB at 40/37/28/30 s, glibc's hugetlb tunable and MALLOC_ARENA_MAX=1 changed
    neither, and 1 MiB in the forward only with 32 MiB and malloc_trim after each step 2.3 GB at
    ~30 s (at Qwen2-VL-2B: 6.8 GB, 0.70x the peft loop's, against 5.8 GB with this). Memory first:
    the page faults of mmapped tensors cost up to a quarter of a CPU step. MALLOC_MMAP_THRESHOLD_ in
    the environment, set by the user, wins. A no-op elsewhere (macOS, musl, Windows).
    """
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_mmap_threshold = -3  # malloc.h
    return bool(libc.mallopt(m_mmap_threshold, threshold))


def release_checkpoint_files(model: torch.nn.Module) -> int:
    """Copy the CPU tensors that still live in memory-mapped checkpoint files into the process's own
    memory, so the mappings close; returns the bytes copied.

    On CPU, transformers leaves every weight it does not convert (the precise vision tower, norms,
    lm_head: 601 MB at the SmolVLM-256M shape) as a view of the mmapped safetensors shard, and the
    whole shard stays mapped, the quantized layers' fp32 source pages included. Memory then reads
    wrong both ways: the resident set counts shard pages training never touches again, and the
    anonymous memory misses weights it needs. After this copy the anonymous memory is the memory the
    model needs. Tied tensors stay tied (one copy per shared storage). A no-op off Linux and on GPU.
    """
    mapped = file_mapped_ranges()
    copies: dict[tuple, torch.Tensor] = {}
    copied = 0
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is None or tensor.device.type != "cpu" or not tensor.numel():
                    continue
                pointer = tensor.data_ptr()
                if not any(start <= pointer < end for start, end in mapped):
                    continue
                key = (pointer, tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
                if key not in copies:
                    copies[key] = tensor.data.clone()
                    copied += tensor.numel() * tensor.element_size()
                tensor.data = copies[key]
    return copied


def file_mapped_ranges() -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of .safetensors files (Linux /proc/self/maps)."""
    try:
        with open("/proc/self/maps") as maps:
            lines = [line.split() for line in maps]
    except OSError:
        return []
    ranges = []
    for fields in lines:
        if len(fields) >= 6 and fields[5].endswith(".safetensors"):
            start, end = fields[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


def keep_4bit_layout_trainable(model: torch.nn.Module) -> None:
    """Stop bitsandbytes from repacking NF4 weights for its AVX512-BF16 CPU kernel.

    On such CPUs a Linear4bit that runs once in eval mode without grad (a held-out evaluation)
    converts its weight, for good, to a layout served by ``gemv_4bit``, which has no backward:
    later training steps would silently drop the gradient through every frozen 4-bit layer, and
    the bf16 scales would no longer match what ``dequantize`` and the merge see.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total); 4-bit weights count as their logical number of parameters."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":
            n *= 2  # two 4-bit values are packed per uint8 element
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total
