"""Merge a trained run into a full-precision transformers model directory.

QLoRA's adapter was trained against the NF4-quantized base, so the merge uses exactly those
weights: load the base as training did, dequantize the 4-bit layers to fp32, attach the adapter,
and only then fold it in. Merging into the NF4 weights and re-quantizing (peft's default on a
4-bit model) would add a second rounding error on top of the adapter's delta.

The merged directory holds the model (safetensors), tokenizer, processor and ``edgetune.json``
(where it came from, the method, and the measured max |logit difference| between the adapted
model on the dequantized base and what the directory reloads to). Methods exported as "merged"
leave a plain model; the others ("graph", "kv_prefix") keep their artifact in ``method/`` beside
the dequantized base, and ``load_merged`` re-attaches it.

Memory: the check needs the adapted model's logits and the saved directory loaded back, but never
both models at once. ``merge_into`` builds, merges and saves everything torch-side and returns only
the expected logits; the backbone, the adapted model and the checkpoint's memory map are freed
before the directory is reloaded, and freed heap memory goes back to the OS (release_memory). The
peak stays near one fp32 model (``python benchmarks/bench_export.py --merge``; BENCHMARKS.md).
"""

from __future__ import annotations

import ctypes
import gc
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from edgetune.data import collate, load_samples
from edgetune.errors import UserError
from edgetune.io import atomic_output_dir
from edgetune.load import Backbone, load_backbone
from edgetune.methods import PeftMethod, get_method
from edgetune.progress import console
from edgetune.recipe import Recipe, load_recipe

MERGE_TOLERANCE = 1e-3  # fp32 merge: only summation order differs
PROVENANCE_FILE = "edgetune.json"
METHOD_DIR = "method"


@dataclass
class MergeReport:
    merged_dir: str
    max_logit_diff: float
    tolerance: float


def load_run(run_dir: Path) -> Recipe:
    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").is_file() or not (run_dir / "adapter").is_dir():
        raise UserError(f"{run_dir} is not a training run (needs recipe.yaml and adapter/); pass the --out of `edgetune train`")
    return load_recipe(run_dir / "recipe.yaml")


def dequantize_to_fp32(model: Any) -> Any:
    """Replace every bitsandbytes layer by an fp32 nn.Linear holding its dequantized weight; the
    result is as frozen as the 4-bit model was (the new layers would otherwise require grad)."""
    model = model.dequantize().requires_grad_(False)
    # transformers 4.57 leaves these flags set after dequantize(); peft reads them and refuses to
    # merge IA3 into what it takes for a 4-bit model.
    model.is_loaded_in_4bit = model.is_loaded_in_8bit = False
    # transformers 4.57 clears this marker on the top-level config only; a sub-config that keeps
    # it holds a torch.dtype, which save_pretrained cannot write as JSON.
    for sub in model.config.sub_configs:
        getattr(model.config, sub).__dict__.pop("_pre_quantization_dtype", None)
    return model


def load_adapted(run_dir: Path, dequantize: bool) -> tuple[Backbone, Any, Recipe]:
    """The run's backbone (on CPU, fp32) with its trained method attached, in eval mode.

    dequantize: replace the 4-bit layers by fp32 copies of exactly the values training saw.
    """
    recipe, method = load_run_method(run_dir)
    backbone = load_base(recipe, dequantize)
    return backbone, attach_trained(method, backbone, recipe, run_dir), recipe


def load_run_method(run_dir: Path) -> tuple[Recipe, PeftMethod]:
    recipe = load_run(run_dir)
    return recipe, get_method(recipe.method, str(Path(run_dir) / "recipe.yaml"))


def attach_trained(method: PeftMethod, backbone: Backbone, recipe: Recipe, run_dir: Path) -> Any:
    """The run's trained artifact on ``backbone``, in eval mode."""
    return method.load(backbone.model, backbone.family, recipe.method, Path(run_dir) / "adapter").eval()


def load_base(recipe: Recipe, dequantize: bool) -> Backbone:
    """The run's frozen backbone on CPU in fp32, with the 4-bit layers dequantized if asked."""
    backbone = load_backbone(recipe.model, recipe.quantization, torch.device("cpu"), torch.float32)
    if dequantize and recipe.quantization.mode != "none":
        page_out_checkpoint()
        backbone.model = dequantize_to_fp32(backbone.model)
        release_memory()  # the 4-bit layers and the dequantization's temporaries
    return backbone


def release_memory() -> None:
    """Free unreachable objects and hand freed heap memory back to the OS.

    torch takes CPU tensors from malloc, and glibc keeps large freed blocks in the process: without
    malloc_trim a model that was just freed still counts as resident, and the next one lands on top
    of it (at the SmolVLM-256M shape, 1.0 of 1.4 GB stayed). No library does this; on other C
    libraries (musl, macOS) it is only the garbage collection.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def page_out_checkpoint() -> None:
    """Ask the kernel to reclaim the pages of the memory-mapped safetensors files (Linux 5.4+).

    The layers loaded in full precision (vision tower, embeddings, head) are views into the mapped
    checkpoint, which keeps the whole file mapped, so the pages of every weight that was read and
    quantized on load stay resident (clean and reclaimable, but counted) as long as the model lives:
    at the Qwen2-VL-2B shape most of an fp32 model's size on top of the dequantized one.
    MADV_PAGEOUT drops them from this process; nothing is lost (the pages are the file's), and the
    views' pages come back from the page cache on first use. Elsewhere this does nothing.
    """
    madvise_pageout = 21
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        with open("/proc/self/maps") as maps:
            regions = [line.split() for line in maps]
    except (OSError, AttributeError):
        return
    for fields in regions:
        if len(fields) >= 6 and fields[5].endswith(".safetensors"):
            start, end = (int(address, 16) for address in fields[0].split("-"))
            libc.madvise(start, end - start, madvise_pageout)  # an old kernel answers EINVAL: fine


def probe_batch(recipe: Recipe, backbone: Backbone) -> dict[str, Any]:
    """A couple of real samples from the run's data, to compare logits on."""
    samples = load_samples(recipe.data.eval or recipe.data.train)[:2]
    items = [backbone.family.encode_sample(backbone.processor, s, recipe.data.max_length) for s in samples]
    batch = collate(items, backbone.processor.tokenizer.pad_token_id)
    batch.pop("labels")
    return batch


def dequantize_then_merge(run_dir: Path, out_dir: Path, overwrite: bool = False) -> MergeReport:
    """Merge the run into ``out_dir``; raises UserError if the directory's reload differs from the
    adapted model on the dequantized base by more than MERGE_TOLERANCE (max |logit diff|)."""
    recipe, method = load_run_method(run_dir)
    with atomic_output_dir(out_dir, overwrite) as scratch, torch.no_grad():
        with console.status(f"merging {method.name} into the dequantized base"):
            expected, batch = merge_into(scratch, recipe, method, run_dir)
            release_memory()  # the backbone and adapted model (peft holds reference cycles) go before the reload
            provenance = {"run_dir": str(Path(run_dir).resolve()), "recipe": recipe.to_yaml_dict(),
                          "method": {"name": method.name, "export_as": method.export_as}}
            (scratch / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2))
            diff = max_logit_diff(expected, load_merged(scratch).model, batch)
        if diff > MERGE_TOLERANCE:
            raise UserError(f"merge check failed: max |logit diff| {diff:.2e} > {MERGE_TOLERANCE:.0e} between adapted and merged model")
        report = MergeReport(str(out_dir), diff, MERGE_TOLERANCE)
        provenance["merge"] = asdict(report)
        (scratch / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2))
    return report


def merge_into(scratch: Path, recipe: Recipe, method: PeftMethod, run_dir: Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """Load the dequantized base, attach the trained method, save the merged model (or the base and
    the method's artifact) and processor into ``scratch``. Returns the adapted model's logits on the
    probe batch, and that batch; nothing else it loaded outlives the call."""
    backbone = load_base(recipe, dequantize=True)
    batch = probe_batch(recipe, backbone)
    if method.export_as != "merged":
        # The frozen base is saved before the method's modules join it (they attach in place),
        # the trained artifact beside it.
        backbone.model.save_pretrained(scratch, safe_serialization=True)
        shutil.copytree(Path(run_dir) / "adapter", scratch / METHOD_DIR)
    adapted = attach_trained(method, backbone, recipe, run_dir)
    expected = adapted(**batch).logits
    if method.export_as == "merged":
        method.merge(adapted, backbone.family).save_pretrained(scratch, safe_serialization=True)
    backbone.processor.save_pretrained(scratch)
    return expected, batch


def max_logit_diff(expected: torch.Tensor, model: Any, batch: dict[str, Any]) -> float:
    """max |expected - model(batch).logits|, 64 positions at a time (a full-size difference tensor
    would be one more copy of the logits, batch x sequence x vocabulary floats)."""
    got = model(**batch).logits
    rows = zip(expected.flatten(0, -2).split(64), got.flatten(0, -2).split(64))
    return max(float((e - g).abs().max()) for e, g in rows)


@dataclass
class Merged:
    model: Any  # fp32, eval mode; a "graph"/"kv_prefix" method is attached
    processor: Any
    family: Any
    method: Any  # the PeftMethod, or None for a plain model
    provenance: dict


def load_merged(model_dir: Path) -> Merged:
    """A merged directory (or any plain model directory) as export and evaluation use it."""
    from edgetune.families import family_of_model_dir
    from edgetune.recipe import MethodSection

    model_dir = Path(model_dir)
    from edgetune.load import check_model_weights

    family = family_of_model_dir(model_dir, where=str(model_dir))
    check_model_weights(model_dir, where=str(model_dir))
    model = family.model_class().from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
    model = model.eval().requires_grad_(False)
    provenance_file = model_dir / PROVENANCE_FILE
    provenance = json.loads(provenance_file.read_text()) if provenance_file.is_file() else {}
    method = None
    if provenance.get("method", {}).get("export_as", "merged") != "merged":
        config = MethodSection.model_validate(provenance["recipe"]["method"])
        method = get_method(config, str(provenance_file))
        model = method.load(model, family, config, model_dir / METHOD_DIR).eval()
    from edgetune.load import PROCESSOR_ERRORS, processor_error

    try:
        processor = family.load_processor(str(model_dir))
    except PROCESSOR_ERRORS as err:
        raise processor_error(str(model_dir), err) from None
    return Merged(model, processor, family, method, provenance)
