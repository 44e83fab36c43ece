"""export_bundle: a (merged) model directory -> an ONNX bundle the torch-free runtime runs.

The bundle format (manifest.json fields, graph inputs and outputs, precisions, tolerances) is
documented in export/README.md. Every stage runs inside a scratch directory that becomes
``out_dir`` only if all succeed (edgetune.io.atomic_output_dir), so a failed export leaves nothing:

1. load the merged model; measure it on the parity inputs and the recipe's held-out questions
   (the reference, edgetune.export.parity); trace vision.onnx, embed.onnx and decoder.onnx at fp32
   (edgetune.export.graphs); write the tokenizer, preprocessor files and manifest.json; free the
   PyTorch model (at real sizes it and the onnxruntime sessions would not fit in memory together);
2. when the model came from a training run that is still on disk, measure the run as trained
   (the 4-bit backbone with its method);
3. measure the fp32 bundle with the runtime's own OnnxVLM: every graph within FP32_TOLERANCE of
   PyTorch, or a ParityError naming the graph (this proves the trace);
4. precision: passes over the fp32 graphs with onnxruntime's tools (edgetune.export.precision),
   then measure again against the precision's TOLERANCES;
5. optionally the ORT format for mobile builds (edgetune.export.mobile).

The fidelity chain (one row per stage) is printed as a table and written to the manifest.
Everything a family does differently at the prompt/image boundary comes from its hooks
(edgetune.families.base); the runtime side of that boundary is the codec image.codec names.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from safetensors.numpy import save_file as save_numpy

from edgetune.errors import UserError
from edgetune.export import precision as precisions
from edgetune.export.fusions import ATTENTION_FUSIONS, fuse_decoder, fuse_vision, keep_last_logits, restore_traced
from edgetune.export.graphs import OPSET, describe_graph, export_graph, fed_modules, graph_specs, text_dims
from edgetune.export.parity import (
    ParityError,
    Stage,
    answers_with_bundle,
    check_preprocessing,
    fidelity_row,
    graph_diffs,
    logit_figures,
    max_abs_diff,
    onnx_outputs,
    parity_batch,
    parity_codec,
    parity_processor,
    relative_diff,
    torch_outputs,
)
from edgetune.families import family_of_model_dir
from edgetune.io import atomic_output_dir
from edgetune.merge import load_merged, page_out_checkpoint, release_memory
from edgetune.methods.modules import methods_disabled
from edgetune.runtime import OnnxVLM
from edgetune.runtime.bundle import KV_PREFIX_FILE, MANIFEST_FILE, PADDED_ROWS

# Max |diff| of every fp32 graph output against PyTorch (vision and embed outputs, logits).
FP32_TOLERANCE = 1e-3
# What a bundle at each precision must keep, against the merged fp32 model on the parity inputs:
# the decoder's mean KL of the next-token distribution (nats), and the vision and embed graphs'
# max |diff| relative to their output's max |value|. Measured values: export/README.md.
TOLERANCES = {
    "fp32": {"max_abs_diff": FP32_TOLERANCE},
    "fp16": {"kl": 0.005, "vision": 0.01, "embed": 0.01},
    "int8": {"kl": 0.05, "vision": 0.05, "embed": 0.02},
    "int4": {"kl": 1.5, "vision": 0.05, "embed": 0.15},
}
DEFAULT_EVAL_SAMPLES = 64
MB = 1e6  # bundle sizes are in MB of 10^6 bytes, as file sizes are usually given


def export_bundle(
    model_dir: Path,
    out_dir: Path,
    precision: str = "fp32",
    overwrite: bool = False,
    *,
    vision_precision: str | None = None,
    block_size: int = precisions.DEFAULT_BLOCK_SIZE,
    accuracy_level: int = precisions.DEFAULT_ACCURACY_LEVEL,
    symmetric: bool = True,
    lm_head_bits: int | None = None,
    eval_samples: int = DEFAULT_EVAL_SAMPLES,
    ort: bool = False,
    run_dir: Path | None = None,
) -> dict:
    """Export ``model_dir`` to ``out_dir``; returns the manifest (also written as manifest.json).

    precision: the decoder's and the embedding table's weights (fp32, fp16, int8, int4);
    vision_precision: the vision graph's (default by precision: fp32, fp16, int8, int8);
    block_size, accuracy_level, symmetric, lm_head_bits: int4/int8 quantization (edgetune.export.precision);
    eval_samples: held-out questions each stage answers (0: none); ort: also write ORT-format graphs;
    run_dir: the training run ``model_dir`` was merged from, measured as trained (the chain's first stage).
    Raises UserError for a bad option before anything is written, ParityError (a UserError) when a
    stage is beyond its tolerance.
    """
    options = precisions.precision_options(precision, vision_precision, block_size, accuracy_level, symmetric, lm_head_bits)
    return export_bundles(model_dir, {Path(out_dir): options}, overwrite, eval_samples=eval_samples, ort=ort, run_dir=run_dir)[0]


def export_bundles(
    model_dir: Path,
    targets: dict[Path, precisions.PrecisionOptions],
    overwrite: bool = False,
    *,
    eval_samples: int = DEFAULT_EVAL_SAMPLES,
    ort: bool = False,
    run_dir: Path | None = None,
) -> list[dict]:
    """One trace, several bundles: ``targets`` maps each bundle directory to its precision options
    (edgetune.export.precision.precision_options). The PyTorch stages are measured once; each bundle's
    fidelity chain ends with its own precision. All bundles appear, or none (a failure in one removes
    every scratch directory). Returns the manifests in the order of ``targets``."""
    if ort:
        from edgetune.export.mobile import ort_format_problem

        problem = ort_format_problem(OPSET)
        if problem:
            raise UserError(f"--ort: {problem}")
    if eval_samples < 0:
        raise UserError(f"--eval-samples {eval_samples}: must be 0 or more")
    model_dir = Path(model_dir)
    family = family_of_model_dir(model_dir, where="export")
    provenance = source_of(model_dir)
    samples, max_new_tokens = held_out(provenance, eval_samples)
    console = Console(file=sys.stderr)  # bound now: the exporter's output is redirected while it runs
    started = time.perf_counter()
    with ExitStack() as stack:
        scratches = {out: stack.enter_context(atomic_output_dir(out, overwrite)) for out in targets}
        # The fp32 trace lies beside the first bundle (same file system), and each bundle hard-links it.
        first = next(iter(targets))
        trace = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f".{first.name}.trace-", dir=first.parent)))
        # The traced decoder waits here while the fused one is checked (outside the bundle: not in its size).
        aside = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f".{first.name}.traced-", dir=first.parent)))
        with console.status(f"loading {model_dir}"):
            merged = load_merged(model_dir)  # a "graph" method's modules are attached and get traced
            model, processor = merged.model, merged.processor
        knobs = family.parity_knobs(processor)
        with console.status("measuring the merged model (PyTorch)"):
            reference = measure_torch("merged fp32 (pytorch)", family, model, processor, samples, max_new_tokens, knobs=knobs)
            reference.size_mb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / MB
        image, prompt = family.bundle_sections(model, processor, model_dir)
        # The runtime's image section under the parity knobs, for the codec that runs the parity images.
        parity = Parity(knobs, family.bundle_sections(model, parity_processor(family, processor, knobs), model_dir)[0]
                        if knobs else None, processor, family)
        kv_prefix = merged.method is not None and merged.method.export_as == "kv_prefix"
        graphs = {}
        for spec in graph_specs(family, model, processor):
            # A KV prefix is not traced: the runtime feeds it as the first cached tokens.
            with console.status(f"exporting {spec.name}.onnx"), methods_disabled(model) if kv_prefix else nullcontext():
                graphs[spec.name] = describe_graph(export_graph(spec, trace))
        dims = text_dims(family, model)
        manifest = {
            "format_version": 1,  # raised below if the bundle needs a newer runtime
            "family": family.name,
            "precision": "fp32",
            "vision_precision": "fp32",
            "quantization": precisions.PrecisionOptions().manifest_section(),
            "graphs": graphs,
            "text": vars(dims),
            "image": image,
            "tokenizer": save_tokenizer(processor, model, trace, model_dir),
            "prompt": prompt,
            "source": provenance,
        }
        prefix = merged.method.kv_prefix(model, family) if kv_prefix else None
        if kv_prefix:
            manifest["kv_prefix"] = save_kv_prefix(prefix, trace)
        if kv_prefix or fed_modules(model):
            manifest["format_version"] = 2
        if image["codec"] != "clip" or family.rope != "1d" or family.decoder_extras:
            manifest["format_version"] = 3
        version = manifest["format_version"]
        del merged, model, spec  # the PyTorch model is not needed past this point
        release_memory()
        page_out_checkpoint()
        trained = measure_run(run_dir, provenance, family, reference, samples, max_new_tokens, console, knobs) if run_dir else None
        # The fused decoder first (edgetune.export.fusions); if it fails the fp32 check, the traced one.
        # Not with a KV prefix: GroupQueryAttention takes the cache's length for the prompt's start.
        for fused in (True, False) if family.fuse_decoder and not kv_prefix else (False,):
            with console.status("fusing decoder.onnx's attention into onnxruntime's operators" if fused else "checking the traced decoder"):
                tied = prepare_decoder(trace, aside / "decoder.onnx", manifest, fused, dims.hidden_size, version)
            try:
                with console.status("checking the fp32 bundle against PyTorch"):
                    fp32_stage, checks = measure_bundle("onnx fp32", trace, reference, samples, max_new_tokens, parity, preprocessing=True)
                manifest["parity"] = {**check_fp32(checks), "processor": knobs}
                break
            except Exception as err:  # a ParityError, or onnxruntime refusing the fused graph's inputs
                if not fused:
                    raise
                console.print(f"[yellow]the fused decoder does not match PyTorch ({str(err).splitlines()[0]}); exporting the traced one")
        manifests = []
        for out, options in targets.items():
            scratch, options = scratches[out], options.for_table(tied)
            for item in trace.iterdir():  # the tokenizer, preprocessor and prefix files; graphs below
                if not item.name.endswith((".onnx", ".onnx.data")):
                    shutil.copy2(item, scratch / item.name)
            bundle = copy.deepcopy(manifest)
            bundle.update(precision=options.precision, vision_precision=options.vision_precision,
                          quantization=options.manifest_section())
            stages = ([trained] if trained else []) + [reference, fp32_stage]
            what = f"{options.precision}" + ("" if options.vision_precision == options.precision else f", vision {options.vision_precision}")
            with console.status(f"writing the graphs at {what}"):
                report = convert_graphs(trace, scratch, bundle, options, tied, dims.hidden_size)
            if kv_prefix and options.precision == "fp16":  # the prefix is stored in the cache's dtype
                bundle["kv_prefix"] = save_kv_prefix(prefix, scratch, "float16")
            if options.precision != "fp32" or options.vision_precision != "fp32":
                bundle["quantization"]["graphs"] = report
                write_manifest(scratch, bundle)
                with console.status(f"measuring the {what} bundle"):
                    final, checks = measure_bundle(f"onnx {what}", scratch, reference, samples, max_new_tokens, parity)
                stages.append(final)
                bundle["tolerances"] = check_precision(options, reference, final, checks)
            else:
                bundle["tolerances"] = {"precision": "fp32", "limits": TOLERANCES["fp32"]}
            bundle["fidelity"] = [fidelity_row(stage, reference, samples) for stage in stages]
            if ort:
                from edgetune.export.mobile import add_ort_models

                with console.status(f"converting {out.name}'s graphs to the ORT format"):
                    bundle["ort"] = add_ort_models(scratch, bundle)
                    write_manifest(scratch, bundle)  # the runtime finds the .ort graphs through it
                    bundle["ort"]["fidelity"] = check_ort_twin(scratch, reference, stages[-1], options, parity)
            write_manifest(scratch, bundle)
            manifests.append(bundle)
        del prefix
    for out, bundle in zip(targets, manifests):
        console.print(fidelity_table(bundle["fidelity"], out))
    console.print(f"exported {', '.join(map(str, targets))} in {time.perf_counter() - started:.0f}s", soft_wrap=True)
    return manifests


# ---- the fp32 decoder --------------------------------------------------------------------------

def prepare_decoder(trace: Path, traced: Path, manifest: dict, fused: bool, hidden: int, version: int) -> bool:
    """decoder.onnx as traced or fused (edgetune.export.fusions; the traced graph is kept at ``traced``
    meanwhile), the tied table shared with it and the manifest written for the runtime (format
    ``version``, 4 if the runtime must run padded rows one at a time); returns whether the table is tied."""
    decoder = trace / "decoder.onnx"
    fusions = {}
    if fused:
        fusions = fuse_decoder(decoder, traced)
    elif traced.exists():
        restore_traced(traced, decoder)
    keep_last_logits(decoder)
    manifest["graphs"]["decoder"] = describe_graph(decoder)
    manifest["decoder_fusions"] = fusions
    manifest["text"].pop("padded_rows", None)
    manifest["format_version"] = version
    if ATTENTION_FUSIONS & set(fusions):
        manifest["text"]["padded_rows"] = PADDED_ROWS
        manifest["format_version"] = 4
    tied = precisions.is_tied(trace / "embed.onnx", decoder)
    manifest["text"]["tied_embeddings"] = tied
    if tied:
        share_table(trace, manifest, "fp32", precisions.PrecisionOptions(), hidden)
    write_manifest(trace, manifest)  # the runtime loads the bundle through it
    return tied


# ---- stages ------------------------------------------------------------------------------------


def held_out(provenance: dict, count: int) -> tuple[list[Any], int]:
    """The recipe's first ``count`` held-out samples (none without a recipe or eval data) and its
    max_new_tokens."""
    from edgetune.data import load_samples

    recipe = provenance.get("recipe") or {}
    path = (recipe.get("data") or {}).get("eval")
    max_new_tokens = (recipe.get("train") or {}).get("max_new_tokens", 16)
    if not count or not path or not Path(path).is_file():
        return [], max_new_tokens
    return load_samples(Path(path))[:count], max_new_tokens


@dataclass
class Parity:
    """How the parity images are run: the family's parity knobs (edgetune.export.parity), the runtime's
    image section under them (None without knobs), and for the preprocessing check at the bundle's
    own settings the HF processor (its own settings) and family."""

    knobs: dict
    image: dict | None
    processor: Any
    family: Any


def measure_torch(name: str, family: Any, model: Any, processor: Any, samples: list[Any], max_new_tokens: int,
                  reference: Stage | None = None, knobs: dict | None = None) -> Stage:
    """A PyTorch model on the parity batches (under the parity ``knobs``; decode fed the reference's
    tokens) and the held-out questions (at the processor's own settings)."""
    from edgetune.evaluate import answer_with_torch

    outputs = {}
    for batch in (1, 2):
        next_ids = reference.outputs[batch].next_ids if reference is not None else None
        outputs[batch] = torch_outputs(family, model, parity_processor(family, processor, knobs), *parity_batch(batch), next_ids)
    answers = answer_with_torch(model, processor, family, samples, max_new_tokens) if samples else None
    return Stage(name, outputs, answers)


def measure_run(run_dir: Path, provenance: dict, family: Any, reference: Stage, samples: list[Any], max_new_tokens: int,
                console: Console, knobs: dict) -> Stage | None:
    """The training run the model was merged from, as trained (4-bit backbone + method); None, with a
    note, if it cannot be loaded any more."""
    from edgetune.merge import load_adapted

    method = (provenance.get("method") or {}).get("name", "method")
    try:
        with console.status(f"measuring the training run {run_dir} (PyTorch)"):
            backbone, model, recipe = load_adapted(Path(run_dir), dequantize=False)
            name = f"{recipe.quantization.mode} + {method} (pytorch)"
            stage = measure_torch(name, family, model, backbone.processor, samples, max_new_tokens, reference, knobs)
            stage.size_mb = model.get_memory_footprint() / MB
    except UserError as err:  # e.g. the base model was moved: the chain starts at the merged model
        console.print(f"[yellow]not measuring the training run: {err}")
        return None
    del backbone, model
    release_memory()
    return stage


def measure_bundle(name: str, bundle_dir: Path, reference: Stage, samples: list[Any], max_new_tokens: int,
                   parity: Parity, preprocessing: bool = False) -> tuple[Stage, list[dict]]:
    """The bundle (through the runtime's own OnnxVLM) on the parity batches and held-out questions;
    also the per-graph checks against the reference, and with ``preprocessing`` and parity knobs the
    runtime's pixel values at the bundle's own settings against the HF processor's."""
    vlm = OnnxVLM.load(bundle_dir)
    outputs, checks = {}, []
    with parity_codec(vlm, parity.image):
        for batch, expected in reference.outputs.items():
            outputs[batch] = onnx_outputs(vlm, expected, *parity_batch(batch))
    if preprocessing and parity.image:
        for image, diff in check_preprocessing(parity.family, parity.processor, vlm).items():
            checks.append({"graph": "preprocessing", "inputs": f"{image}, the bundle's own settings", "max_abs_diff": diff})
    for batch, expected in reference.outputs.items():
        for step, diff in graph_diffs(expected, outputs[batch]).items():
            graph = step if step in ("vision", "embed") else "decoder"
            inputs = f"batch {batch}" + ("" if graph != "decoder" else f", {PARITY_STEPS[step]}")
            checks.append({"graph": f"{graph}.onnx", "inputs": inputs, "max_abs_diff": diff})
    answers = answers_with_bundle(vlm, samples, max_new_tokens) if samples else None
    del vlm
    release_memory()
    size = sum(f.stat().st_size for f in bundle_dir.rglob("*") if f.is_file()) / MB
    return Stage(name, outputs, answers, size), checks


PARITY_STEPS = {"prefill": "prefill, past 0", "decode": "decode 1 token, past = prompt"}


def check_ort_twin(bundle_dir: Path, reference: Stage, onnx_stage: Stage, options: Any, parity: Parity) -> dict:
    """The .ort graphs on the parity inputs: their figures against the reference, held to the same
    limits as the .onnx bundle, and their largest logit difference from the .onnx twin (the converter
    saves graphs optimized for the CPU provider, so kernels may differ: at int4 with accuracy level 4
    by up to ~0.1 in logits on the tiny models)."""
    vlm = OnnxVLM.load(bundle_dir, model_format="ort")
    with parity_codec(vlm, parity.image):
        stage = Stage("ort", {batch: onnx_outputs(vlm, expected, *parity_batch(batch)) for batch, expected in reference.outputs.items()})
    del vlm
    figures = logit_figures(reference, stage)
    twin = max(max(max_abs_diff(stage.outputs[b].prefill, onnx_stage.outputs[b].prefill),
                   max_abs_diff(stage.outputs[b].decode, onnx_stage.outputs[b].decode)) for b in stage.outputs)
    limit = TOLERANCES[options.precision].get("kl")
    if twin > FP32_TOLERANCE and (limit is None or figures["kl"] > limit):
        raise ParityError(
            f"decoder.ort differs from decoder.onnx by {twin:.3g} in logits (mean KL vs the merged fp32 model "
            f"{figures['kl']:.3g}, tolerance {limit if limit is not None else FP32_TOLERANCE:g})"
        )
    return {**figures, "max_abs_logit_diff_vs_onnx": twin}


def check_fp32(checks: list[dict]) -> dict:
    """The fp32 bundle must reproduce PyTorch to FP32_TOLERANCE in every graph: this proves the trace."""
    for check in checks:
        if check["max_abs_diff"] > FP32_TOLERANCE:
            raise ParityError(
                f"{check['graph']} differs from PyTorch by {check['max_abs_diff']:.3g} "
                f"({check['inputs']}); tolerance is {FP32_TOLERANCE:g}. "
                "Set EDGETUNE_DEBUG=1 and re-run to see the exporter's log"
            )
    return {"tolerance": FP32_TOLERANCE, "checks": checks}


def check_precision(options: Any, reference: Stage, final: Stage, checks: list[dict]) -> dict:
    """The converted bundle against the precision's TOLERANCES; ParityError names the graph and values."""
    limits = TOLERANCES[options.precision]
    figures = logit_figures(reference, final)
    measured = {
        "kl": figures["kl"],
        "vision": max(relative_diff(final.outputs[b].vision, reference.outputs[b].vision) for b in final.outputs),
        "embed": max(relative_diff(final.outputs[b].embed, reference.outputs[b].embed) for b in final.outputs),
    }
    graphs = {"kl": "decoder.onnx", "vision": "vision.onnx", "embed": "embed.onnx"}
    what = {"kl": "mean KL of the next-token distribution", "vision": "relative max |diff| of image_embeds",
            "embed": "relative max |diff| of inputs_embeds"}
    for key, limit in limits.items():
        if measured[key] > limit:
            raise ParityError(
                f"{graphs[key]} at {options.precision} (vision {options.vision_precision}): {what[key]} vs the merged "
                f"fp32 model is {measured[key]:.3g}, tolerance {limit:g} (max |logit diff| {figures['max_abs_logit_diff']:.3g}, "
                f"mean {figures['mean_abs_logit_diff']:.3g}); try a smaller --block-size, --accuracy-level 0 or a higher precision"
            )
    return {"precision": options.precision, "limits": limits, "measured": measured, "checks": checks}


# ---- precision ---------------------------------------------------------------------------------


def convert_graphs(trace: Path, scratch: Path, manifest: dict, options: Any, tied: bool, hidden: int) -> dict:
    """Each fp32 graph of ``trace`` written into ``scratch`` at its precision (updating the manifest's
    graphs); returns per graph what was quantized."""
    report = {}
    keep = {  # float32 at the graph boundary at fp16: what the runtime writes and reads
        "vision": [v["name"] for v in manifest["graphs"]["vision"]["inputs"] + manifest["graphs"]["vision"]["outputs"]],
        "embed": ["inputs_embeds"],
        "decoder": [v["name"] for v in manifest["graphs"]["decoder"]["inputs"] if not v["name"].startswith("past_key_values.")] + ["logits"],
    }
    for name, precision in (("vision", options.vision_precision), ("decoder", options.precision)):
        report[name] = precisions.convert_graph(trace / f"{name}.onnx", scratch / f"{name}.onnx", precision, options, keep[name])
    quantized_vision = options.vision_precision in precisions.BITS
    manifest["vision_fusions"] = fuse_vision(scratch / "vision.onnx") if quantized_vision else {}
    if tied and options.precision != "fp32":
        if not precisions.can_share(options.precision, options, hidden):
            raise UserError(f"--block-size {options.block_size}: a tied embedding table of width {hidden} needs a block size that divides it")
        share_table(scratch, manifest, options.precision, options, hidden)
        report["embed"] = {"shared_with": "decoder.onnx"}
    else:  # at fp32 a tied embed.onnx already reads decoder.onnx.data
        report["embed"] = precisions.convert_graph(trace / "embed.onnx", scratch / "embed.onnx", options.precision, options,
                                                   keep["embed"], op_type="Gather")
    for name in ("vision", "embed", "decoder"):
        manifest["graphs"][name] = describe_graph(scratch / f"{name}.onnx")
    return report


def share_table(scratch: Path, manifest: dict, precision: str, options: Any, hidden: int) -> None:
    precisions.share_tied_table(scratch / "embed.onnx", scratch / "decoder.onnx", precision, options, hidden)
    manifest["graphs"]["embed"] = describe_graph(scratch / "embed.onnx")


def fidelity_table(rows: list[dict], out_dir: Path) -> Table:
    table = Table(title=f"fidelity of {out_dir} against the merged fp32 model")
    for column in ("stage", "accuracy", "agree", "max |Δlogit|", "mean |Δlogit|", "KL", "MB"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    percent = lambda value: "-" if value is None else f"{value:.1%}"  # noqa: E731
    for row in rows:
        table.add_row(row["stage"], percent(row["accuracy"]), percent(row["agreement"]), f"{row['max_abs_logit_diff']:.2e}",
                      f"{row['mean_abs_logit_diff']:.2e}", f"{row['kl']:.2e}", f"{row['bundle_mb']:.1f}")
    return table


# ---- files -------------------------------------------------------------------------------------


def save_tokenizer(processor: Any, model: Any, out_dir: Path, model_dir: Path) -> dict:
    """Write tokenizer.json (+ HF configs, preprocessor_config.json); return the manifest's section."""
    tokenizer = processor.tokenizer
    if not tokenizer.is_fast:
        raise UserError(f"{model_dir}: the runtime needs a fast tokenizer (tokenizer.json); none loaded")
    tokenizer.save_pretrained(out_dir)
    processor.image_processor.save_pretrained(out_dir)
    eos = model.generation_config.eos_token_id
    eos = tokenizer.eos_token_id if eos is None else eos
    bos = tokenizer.bos_token_id
    return {
        "file": "tokenizer.json",
        "add_special_tokens": True,  # the HF processor tokenizes the rendered prompt with them
        "adds_bos": bos is not None and tokenizer("x").input_ids[:1] == [bos],
        "bos_token_id": bos,
        "eos_token_ids": eos if isinstance(eos, list) else [eos],
        "pad_token_id": tokenizer.pad_token_id,
    }


def save_kv_prefix(prefix: list[tuple[torch.Tensor, torch.Tensor]], out_dir: Path, dtype: str = "float32") -> dict:
    """kv_prefix.safetensors: per layer the prefix keys/values [kv_heads, length, head_dim] in the KV
    cache's dtype, named like the decoder's past inputs; the manifest's section."""
    tensors = {}
    for i, (key, value) in enumerate(prefix):
        tensors[f"past_key_values.{i}.key"] = key.float().contiguous().numpy().astype(dtype)
        tensors[f"past_key_values.{i}.value"] = value.float().contiguous().numpy().astype(dtype)
    (out_dir / KV_PREFIX_FILE).unlink(missing_ok=True)  # a new file, not the hard-linked trace's
    save_numpy(tensors, str(out_dir / KV_PREFIX_FILE))
    return {"file": KV_PREFIX_FILE, "length": int(prefix[0][0].shape[1])}


def source_of(model_dir: Path) -> dict:
    """Where the model came from: the provenance earlier stages record in edgetune.json, if any."""
    recorded = model_dir / "edgetune.json"
    if not recorded.is_file():
        return {"model": str(model_dir)}
    try:
        return json.loads(recorded.read_text())
    except ValueError as err:
        raise UserError(f"{recorded} is not valid JSON ({err}); fix or delete it") from None


def write_manifest(out_dir: Path, manifest: dict) -> None:
    """Write manifest.json as a new file (bundles of one export hard-link the trace's files)."""
    scratch = out_dir / f".{MANIFEST_FILE}.tmp"
    scratch.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(scratch, out_dir / MANIFEST_FILE)
