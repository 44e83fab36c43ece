"""What an export measures: each stage of the chain against the merged fp32 PyTorch model.

A stage is a model the user could deploy or compare: the 4-bit backbone with the trained method
(PyTorch, as trained), the merged fp32 model (PyTorch, the reference), the ONNX bundle at fp32 and
at the requested precision (onnxruntime). Each is fed the same **parity inputs**: two real images
of different sizes (48x40 and 37x53) with their prompts, as batch 1 and a left-padded batch 2, a
prefill (past 0) and one decode step (past = prompt) on the reference's greedy token. From those:

- ``max_abs_logit_diff`` / ``mean_abs_logit_diff``: |stage - reference| over the logits of the last
  ``KEPT_POSITIONS`` real prompt positions of each row and the decode step;
- ``kl``: the mean over those positions of KL(reference || stage) of the next-token distribution
  (nats);
- per graph (ONNX stages): ``vision`` (image embeddings, the runtime's own preprocessing included),
  ``embed`` (token embeddings), ``prefill`` and ``decode`` (logits), as max |diff|.

And on the recipe's held-out data (``eval_samples`` questions): exact-match ``accuracy`` and the
greedy answers' ``agreement`` with the reference's answers.

A family whose own processor settings make many vision frames per image (SmolVLM: 17 tiles of
512 px) runs the parity images at smaller settings (``family.parity_knobs``: 5 frames), the same
graphs and preprocessing paths at a fraction of the cost; ``check_preprocessing`` then compares the
runtime's prompt tokens and pixels with the HF processor's at the bundle's own settings, which
needs no model.

The reference's outputs are kept as numpy arrays, so that the PyTorch model can be freed before
onnxruntime loads the bundle (at real sizes the two would not fit in memory together). Only the
last ``KEPT_POSITIONS`` prompt positions are kept for the same reason: at a 151,936-token vocabulary
a 1,100-token prompt's logits are 0.7 GB per row; the image positions' effect is still measured
through every kept position, and vision.onnx's output is compared in full.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from edgetune.errors import UserError

PARITY_PROMPTS = ["What color is the shape?", "Describe the picture. What shape is this? One word."]
PARITY_STEPS = {"prefill": "prefill, past 0", "decode": "decode 1 token, past = prompt"}
KEPT_POSITIONS = 32
PIXEL_TOLERANCE = 1e-4  # the runtime's pixel values against the HF processor's (PIL vs PIL, float32)


class ParityError(UserError):
    """An exported graph disagrees with PyTorch beyond the precision's tolerance."""


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


@dataclass
class Outputs:
    """One stage's outputs on one batch of parity inputs (numpy, float32)."""

    ids: np.ndarray  # [batch, seq] prompt token ids (left padded)
    mask: np.ndarray  # [batch, seq]
    prefill: np.ndarray  # [rows, vocab]: the last KEPT_POSITIONS real positions of each row
    decode: np.ndarray  # [batch, vocab]
    vision: np.ndarray | None = None  # [image tokens, hidden]
    embed: np.ndarray | None = None  # [batch, seq, hidden]
    next_ids: np.ndarray | None = None  # [batch, 1] the greedy token the decode step was fed


@dataclass
class Stage:
    """A stage's outputs on every parity batch, and its answers to the held-out questions."""

    name: str
    outputs: dict[int, Outputs]  # batch size -> outputs
    answers: list[str] | None = None
    size_mb: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)


def kept_positions(mask: np.ndarray) -> np.ndarray:
    """Boolean [batch, seq]: the last KEPT_POSITIONS real (unpadded) positions of each row."""
    from_end = np.cumsum(mask[:, ::-1], axis=1)[:, ::-1]
    return (mask == 1) & (from_end <= KEPT_POSITIONS)


# ---- PyTorch ------------------------------------------------------------------------------------


def parity_batch(batch: int) -> tuple[list[Image.Image], list[str]]:
    """The images and prompts of parity batch 1 or 2."""
    return [parity_image(i) for i in range(batch)], PARITY_PROMPTS[:batch]


def parity_processor(family: Any, processor: Any, knobs: dict[str, Any]) -> Any:
    """``processor`` under the family's parity knobs (a copy; ``processor`` itself when there are none)."""
    if not knobs:
        return processor
    processor = copy.deepcopy(processor)
    family.configure_processor(processor, knobs)
    return processor


def torch_outputs(family: Any, model: Any, processor: Any, images: list[Image.Image], prompts: list[str],
                  next_ids: np.ndarray | None = None) -> Outputs:
    """A PyTorch model's outputs on one image per prompt (a left-padded batch); the decode step is fed
    ``next_ids`` (the reference's greedy tokens) or, for the reference itself, its own greedy tokens."""
    import torch

    inputs = family.prompt_inputs(processor, prompts, [[image] for image in images])
    device = next(model.parameters()).device
    on_device = {k: v.to(device) for k, v in inputs.items()}
    with torch.no_grad():
        full = model(**on_device, **maybe_positions(family, model, inputs)).logits.float().cpu().numpy()
        mask = inputs["attention_mask"].numpy()
        if next_ids is None:
            next_ids = full[:, -1].argmax(-1)[:, None]
        longer = family.extend_inputs(inputs, torch.from_numpy(next_ids))
        step = model(**{k: v.to(device) for k, v in longer.items()}, **maybe_positions(family, model, longer))
        vision = family.image_embeds(model, on_device).float().cpu().numpy()
        embed = model.get_input_embeddings()(on_device["input_ids"]).float().cpu().numpy()
    return Outputs(
        ids=inputs["input_ids"].numpy(),
        mask=mask,
        prefill=full[kept_positions(mask)],
        decode=step.logits[:, -1].float().cpu().numpy(),
        vision=vision,
        embed=embed,
        next_ids=next_ids,
    )


def maybe_positions(family: Any, model: Any, inputs: Any) -> dict[str, Any]:
    positions = family.position_ids(model, inputs)
    return {} if positions is None else {"position_ids": positions.to(next(model.parameters()).device)}


# ---- onnxruntime --------------------------------------------------------------------------------


def onnx_outputs(vlm: Any, reference: Outputs, images: list[Image.Image], prompts: list[str]) -> Outputs:
    """The bundle's outputs on the reference's images and prompts. The runtime builds the prompt
    itself (its codec, its tokenizer); its token ids must equal the HF processor's exactly."""
    batch = len(prompts)
    encoded = [vlm.encode_image(image) for image in images]
    rows = [vlm.prompt_ids(p, e) for p, e in zip(prompts, encoded)]
    ids, mask = left_pad(rows, vlm.manifest["tokenizer"]["pad_token_id"])
    if ids.shape != reference.ids.shape or (ids != reference.ids).any():
        raise ParityError(
            f"the runtime's prompt tokens differ from the HF processor's (batch {batch}): "
            f"{ids.tolist()} vs {reference.ids.tolist()}"
        )
    (embed,) = vlm.sessions["embed"].run(None, {"input_ids": ids})
    vision = np.concatenate(vlm.image_embeds(encoded))
    logits, past = vlm.forward(ids, mask, images=encoded)
    longer_mask = np.concatenate([mask, np.ones_like(mask[:, :1])], axis=1)
    step, _ = vlm.forward(reference.next_ids, longer_mask, past)
    return Outputs(ids=ids, mask=mask, prefill=logits[kept_positions(mask)], decode=step[:, -1], vision=vision, embed=embed)


@contextmanager
def parity_codec(vlm: Any, image_section: dict | None):
    """``vlm`` encoding images with the codec of ``image_section`` (the manifest's image section under
    the parity knobs) inside the block, its own codec again after it."""
    if image_section is None:
        yield vlm
        return
    from edgetune.runtime.codecs import get_codec

    own = vlm.codec
    vlm.codec = get_codec({**vlm.manifest, "image": image_section})
    try:
        yield vlm
    finally:
        vlm.codec = own


def check_preprocessing(family: Any, processor: Any, vlm: Any) -> dict[str, float]:
    """The runtime's preprocessing at the bundle's own settings against the HF processor's, on each
    parity image alone: the prompt token ids must be equal (they spell out a tiled image's grid) and
    the vision graph's pixel inputs within 1e-4 (max |diff|, returned). Runs no model."""
    diffs = {}
    for index, prompt in enumerate(PARITY_PROMPTS):
        image = parity_image(index)
        expected = family.prompt_inputs(processor, [prompt], [[image]])
        encoded = vlm.encode_image(image)
        ids = vlm.prompt_ids(prompt, encoded)
        if ids != expected["input_ids"][0].tolist():
            raise ParityError(f"the runtime's prompt tokens for parity image {index} differ from the HF processor's "
                              f"at the bundle's own settings: {len(ids)} tokens vs {expected['input_ids'].shape[1]}")
        ours, theirs = encoded.feeds["pixel_values"].ravel(), expected["pixel_values"].numpy().ravel()
        # float32, no copies: at SmolVLM's own settings an image is 17 frames of 512 px (53 MB)
        diff = float(np.abs(ours - theirs).max()) if ours.shape == theirs.shape else float("inf")
        if diff > PIXEL_TOLERANCE:
            raise ParityError(f"the runtime's pixel values for parity image {index} differ from the HF processor's at the "
                              f"bundle's own settings by {diff:.3g} (shapes {ours.shape}, {theirs.shape}); tolerance {PIXEL_TOLERANCE:g}")
        diffs[f"image {index}"] = diff
    return diffs


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """int64 ids and mask [batch, longest], padded on the left as generation batches are."""
    longest = max(len(row) for row in rows)
    ids = np.full((len(rows), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), longest), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, longest - len(row) :], mask[i, longest - len(row) :] = row, 1
    return ids, mask


def compare_with_pytorch(family: Any, model: Any, processor: Any, vlm: Any, images: list[Image.Image],
                         prompts: list[str]) -> dict[str, float]:
    """Max |ONNX - PyTorch| on one batch: "vision" (image embeddings, preprocessing included),
    "embed", "prefill" (logits, past 0) and "decode" (one greedy token on the prefill's cache)."""
    reference = torch_outputs(family, model, processor, images, prompts)
    return graph_diffs(reference, onnx_outputs(vlm, reference, images, prompts))


# ---- comparisons --------------------------------------------------------------------------------


def graph_diffs(reference: Outputs, stage: Outputs) -> dict[str, float]:
    """Max |diff| per graph output: vision, embed (when both have them), prefill and decode logits."""
    diffs = {}
    for name in ("vision", "embed", "prefill", "decode"):
        ours, theirs = getattr(stage, name), getattr(reference, name)
        if ours is not None and theirs is not None:
            diffs[name] = max_abs_diff(ours, theirs)
    return diffs


def logit_figures(reference: Stage, stage: Stage) -> dict[str, float]:
    """max/mean |logit diff| and mean KL(reference || stage) over every kept position of every batch."""
    ref = np.concatenate([np.concatenate([o.prefill, o.decode]) for o in reference.outputs.values()]).astype(np.float64)
    got = np.concatenate([np.concatenate([o.prefill, o.decode]) for o in stage.outputs.values()]).astype(np.float64)
    diff = np.abs(got - ref)
    return {"max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()), "kl": mean_kl(ref, got)}


def mean_kl(reference_logits: np.ndarray, logits: np.ndarray) -> float:
    """Mean over rows of KL(softmax(reference) || softmax(logits)), in nats."""
    log_p = log_softmax(reference_logits)
    log_q = log_softmax(logits)
    return float(np.maximum((np.exp(log_p) * (log_p - log_q)).sum(-1), 0.0).mean())


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def max_abs_diff(a: Any, b: Any) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def relative_diff(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b|: a graph output's error on the scale of its values."""
    return max_abs_diff(a, b) / max(float(np.abs(np.asarray(b, dtype=np.float64)).max()), 1e-12)


# ---- held-out questions -------------------------------------------------------------------------


def answers_with_bundle(vlm: Any, samples: list[Any], max_new_tokens: int) -> list[str]:
    return [vlm.generate(s.images[0], s.question, max_new_tokens=max_new_tokens) for s in samples]


def fidelity_row(stage: Stage, reference: Stage, samples: list[Any]) -> dict:
    """One row of the manifest's fidelity list (None where the figure does not apply)."""
    from edgetune.data import normalize_answer

    row: dict[str, Any] = {"stage": stage.name, "accuracy": None, "agreement": None}
    if stage.answers is not None and samples:
        row["accuracy"] = sum(normalize_answer(a) == normalize_answer(s.answer) for a, s in zip(stage.answers, samples)) / len(samples)
        if reference.answers is not None:
            same = sum(normalize_answer(a) == normalize_answer(b) for a, b in zip(stage.answers, reference.answers))
            row["agreement"] = same / len(samples)
    row.update(logit_figures(reference, stage))
    row["bundle_mb"] = round(stage.size_mb, 3)
    row.update(stage.notes)
    return row
