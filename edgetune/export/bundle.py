"""export_bundle: a (merged) model directory -> an ONNX bundle the torch-free runtime runs.

The bundle format (manifest.json fields, graph inputs and outputs, tolerances) is documented in
export/README.md. Stages, all inside a scratch directory that becomes ``out_dir`` only if every
stage succeeds (edgetune.io.atomic_output_dir), so a failed export leaves nothing behind:

1. trace vision.onnx, embed.onnx and decoder.onnx at fp32 (edgetune.export.graphs);
2. precision: fp32 is what the exporter writes; fp16/int8/int4 will be onnxruntime.quantization
   passes over those fp32 files, inserted here, each with its own tolerance in TOLERANCES;
3. write the tokenizer and preprocessor files and manifest.json;
4. parity: load the bundle with the runtime's own OnnxVLM, feed it what the HF processor makes of
   a real image and prompt (batch 1 and 2; prefill with past 0, then one decode step with past > 0)
   and compare with the PyTorch model's full forward. Beyond tolerance raises ParityError.

Everything a family does differently at the prompt/image boundary comes from its hooks
(edgetune.families.base): the manifest's image and prompt sections, the vision graph, the
decoder's extra inputs; the runtime side of the same boundary is the codec the image section names.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from rich.console import Console
from safetensors.numpy import save_file as save_numpy

from edgetune.errors import UserError
from edgetune.export.graphs import describe_graph, export_graph, fed_modules, graph_specs, text_dims
from edgetune.families import family_of_model_dir
from edgetune.families.base import ModelFamily
from edgetune.io import atomic_output_dir
from edgetune.merge import load_merged
from edgetune.methods.modules import methods_disabled
from edgetune.runtime import OnnxVLM
from edgetune.runtime.bundle import KV_PREFIX_FILE, MANIFEST_FILE

# Max |logit diff| against PyTorch that an export at each precision must meet.
TOLERANCES = {"fp32": 1e-3}
PROMPT_SENTINEL = "EDGETUNE_PROMPT_SENTINEL"
PARITY_STEPS = {"prefill": "prefill, past 0", "decode": "decode 1 token, past = prompt"}
PARITY_PROMPTS = ["What color is the shape?", "Describe the picture. What shape is this? One word."]


class ParityError(UserError):
    """An exported graph disagrees with PyTorch beyond the precision's tolerance."""


def export_bundle(model_dir: Path, out_dir: Path, precision: str = "fp32", overwrite: bool = False) -> dict:
    """Export ``model_dir`` to ``out_dir``; returns the manifest (also written as manifest.json)."""
    if precision not in TOLERANCES:
        raise UserError(f"precision '{precision}' is not available yet; available: {', '.join(TOLERANCES)}")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    family = family_of_model_dir(model_dir, where="export")
    console = Console(file=sys.stderr)  # bound now: the exporter's output is redirected while it runs
    started = time.perf_counter()
    with atomic_output_dir(out_dir, overwrite) as scratch:
        with console.status(f"loading {model_dir}"):
            merged = load_merged(model_dir)  # a "graph" method's modules are attached and get traced
            model, processor = merged.model, merged.processor
        image, prompt = family.bundle_sections(model, processor, model_dir)
        kv_prefix = merged.method is not None and merged.method.export_as == "kv_prefix"
        graphs = {}
        for spec in graph_specs(family, model, processor):
            # A KV prefix is not traced: the runtime feeds it as the first cached tokens.
            with console.status(f"exporting {spec.name}.onnx"), methods_disabled(model) if kv_prefix else nullcontext():
                graphs[spec.name] = describe_graph(export_graph(spec, scratch))
        manifest = {
            "format_version": 1,  # raised below if the bundle needs a newer runtime
            "family": family.name,
            "precision": precision,
            "graphs": graphs,
            "text": vars(text_dims(family, model)),
            "image": image,
            "tokenizer": save_tokenizer(processor, model, scratch, model_dir),
            "prompt": prompt,
            "source": source_of(model_dir),
        }
        if kv_prefix:
            manifest["kv_prefix"] = save_kv_prefix(merged.method.kv_prefix(model, family), scratch)
        if kv_prefix or fed_modules(model):
            manifest["format_version"] = 2
        if image["codec"] != "clip" or family.rope != "1d" or family.decoder_extras:
            manifest["format_version"] = 3
        write_manifest(scratch, manifest)  # the runtime loads the bundle through it; parity is added below
        with console.status("checking ONNX against PyTorch"):
            vlm = OnnxVLM.load(scratch)
            manifest["parity"] = check_parity(family, model, processor, vlm, TOLERANCES[precision])
        write_manifest(scratch, manifest)
    worst = max(check["max_abs_diff"] for check in manifest["parity"]["checks"])
    console.print(
        f"exported {out_dir} in {time.perf_counter() - started:.0f}s "
        f"(max |logit diff| vs PyTorch {worst:.1e}, tolerance {TOLERANCES[precision]:g})",
        soft_wrap=True,
    )
    return manifest


# ---- parity ------------------------------------------------------------------------------------


def check_parity(family: ModelFamily, model: Any, processor: Any, vlm: OnnxVLM, tolerance: float) -> dict:
    """Compare the bundle with PyTorch on batch 1 and 2; raise ParityError naming the first graph
    beyond tolerance (vision and embed are compared on their own outputs, the decoder on logits)."""
    images = [parity_image(0), parity_image(1)]
    checks = []
    for batch in (1, 2):
        diffs = compare_with_pytorch(family, model, processor, vlm, images[:batch], PARITY_PROMPTS[:batch])
        for name, diff in diffs.items():
            graph = name if name in ("vision", "embed") else "decoder"
            inputs = f"batch {batch}, {PARITY_STEPS.get(name, name)}"
            checks.append({"graph": f"{graph}.onnx", "inputs": inputs, "max_abs_diff": diff})
    for check in checks:
        if check["max_abs_diff"] > tolerance:
            raise ParityError(
                f"{check['graph']} differs from PyTorch by {check['max_abs_diff']:.3g} "
                f"({check['inputs']}); tolerance is {tolerance:g}. "
                "Set EDGETUNE_DEBUG=1 and re-run to see the exporter's log"
            )
    return {"tolerance": tolerance, "checks": checks}


def compare_with_pytorch(
    family: ModelFamily,
    model: Any,
    processor: Any,
    vlm: OnnxVLM,
    images: list[Image.Image],
    prompts: list[str],
) -> dict[str, float]:
    """Max |ONNX - PyTorch| for one left-padded batch (one image per prompt): "vision" on the image
    embeddings (preprocessing included), "embed" on the token embeddings, "prefill" on the logits
    of every real prompt token (past 0), "decode" on the logits of one greedy token fed on top of
    the prefill's cache (past = padded prompt length). The prompt tokens the runtime builds must
    equal the HF processor's exactly."""
    inputs = family.prompt_inputs(processor, prompts, [[image] for image in images])
    encoded = [vlm.encode_image(image) for image in images]
    ids, mask = left_pad([vlm.prompt_ids(p, e) for p, e in zip(prompts, encoded)], vlm.manifest["tokenizer"]["pad_token_id"])
    expected_ids = inputs["input_ids"].numpy()
    if ids.shape != expected_ids.shape or (ids != expected_ids).any():
        raise ParityError(
            f"the runtime's prompt tokens differ from the HF processor's (batch {len(prompts)}): "
            f"{ids.tolist()} vs {expected_ids.tolist()}"
        )
    (onnx_embeds,) = vlm.sessions["embed"].run(None, {"input_ids": ids})
    onnx_images = np.concatenate(vlm.image_embeds(encoded))
    logits, past = vlm.forward(ids, mask, images=encoded)
    next_ids = logits[:, -1].argmax(-1)[:, None]
    longer_mask = np.concatenate([mask, np.ones_like(mask[:, :1])], axis=1)
    step_logits, _ = vlm.forward(next_ids, longer_mask, past)
    longer = family.extend_inputs(inputs, torch.from_numpy(next_ids))
    with torch.no_grad():
        torch_images = family.image_embeds(model, inputs)
        torch_embeds = model.get_input_embeddings()(inputs["input_ids"])
        full = model(**inputs, **maybe_positions(family, model, inputs))
        step = model(**longer, **maybe_positions(family, model, longer))
    real = mask.astype(bool)  # padding rows attend to nothing; their logits are meaningless
    return {
        "vision": max_abs_diff(onnx_images, torch_images),
        "embed": max_abs_diff(onnx_embeds, torch_embeds),
        "prefill": max_abs_diff(logits[real], full.logits.numpy()[real]),
        "decode": max_abs_diff(step_logits[:, -1], step.logits[:, -1]),
    }


def maybe_positions(family: ModelFamily, model: Any, inputs: Any) -> dict[str, Any]:
    positions = family.position_ids(model, inputs)
    return {} if positions is None else {"position_ids": positions}


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """int64 ids and mask [batch, longest], padded on the left as generation batches are."""
    longest = max(len(row) for row in rows)
    ids = np.full((len(rows), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), longest), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, longest - len(row) :], mask[i, longest - len(row) :] = row, 1
    return ids, mask


def max_abs_diff(a: Any, b: Any) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def parity_image(index: int) -> Image.Image:
    """A small non-square picture (a shape on a plain background), so resize and crop both act."""
    width, height = (48, 40) if index % 2 == 0 else (37, 53)
    image = Image.new("RGB", (width, height), [(250, 250, 240), (20, 30, 60)][index % 2])
    draw = ImageDraw.Draw(image)
    if index % 2 == 0:
        draw.ellipse([8, 6, 38, 34], fill=(220, 30, 40))
    else:
        draw.polygon([(18, 5), (33, 45), (3, 45)], fill=(40, 200, 90))
    return image


def render_prompt(processor: Any, prompt: str) -> str:
    """The chat-formatted single-turn text for one image and ``prompt``, as the HF processor renders it."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


# ---- the prompt section ------------------------------------------------------------------------


def prompt_section(processor: Any, placeholder: str, model_dir: Path) -> dict:
    """The chat template and a pre-rendered single-turn prompt, so the runtime needs no jinja2.

    single_turn is the template rendered for one user message [image, text] with the generation
    prompt, its text replaced by "{prompt}"; the runtime fills it with str.replace (not
    str.format: templates may contain braces) and expands ``image_placeholder``.
    """
    if not processor.chat_template:
        raise UserError(f"{model_dir} has no chat template (chat_template.jinja); add one to the model dir")
    rendered = render_prompt(processor, PROMPT_SENTINEL)
    if rendered.count(PROMPT_SENTINEL) != 1 or rendered.count(placeholder) != 1 or "{prompt}" in rendered:
        raise UserError(
            f"{model_dir}: the chat template must render one user message with exactly one "
            f"'{placeholder}' and the text once; got {rendered!r}"
        )
    single_turn = rendered.replace(PROMPT_SENTINEL, "{prompt}")
    return {
        "chat_template": processor.chat_template,
        "single_turn": single_turn,
        "image_placeholder": placeholder,
        "image_placeholder_offset": single_turn.index(placeholder),
    }


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


def save_kv_prefix(prefix: list[tuple[torch.Tensor, torch.Tensor]], out_dir: Path) -> dict:
    """kv_prefix.safetensors: per layer the prefix keys/values [kv_heads, length, head_dim], named
    like the decoder's past inputs; the manifest's section."""
    tensors = {}
    for i, (key, value) in enumerate(prefix):
        tensors[f"past_key_values.{i}.key"] = key.float().contiguous().numpy()
        tensors[f"past_key_values.{i}.value"] = value.float().contiguous().numpy()
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
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
