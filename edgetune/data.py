"""LLaVA-format conversation data -> model inputs with the loss on the assistant's tokens only.

The file is a JSON list of ``{"id", "image", "conversations": [{"from": "human", "value":
"<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}``; ``image`` is a path relative to the
JSON file (or a list of paths, one per ``<image>``). Every entry is checked when the file is read.

Encoding renders the family's own chat template turn by turn and tokenizes each piece on its
own: the prompt pieces exactly as they will be tokenized at inference time (conversation so far +
generation prompt), the assistant pieces as the labels. The family's processor expands image
placeholders and produces the pixel tensors. A sample longer than ``data.max_length`` is cut
there (``cut_to_max_length``); one whose answers would all be cut is an error.
``edgetune.data_check`` reports all of these, entry by entry, before training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import ExifTags, Image

from edgetune.errors import UserError

IMAGE_PLACEHOLDER = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass
class Sample:
    id: str
    images: list[Path]
    turns: list[tuple[str, str]]  # (role, text) with role "user"|"assistant", placeholders removed

    def messages(self, upto: int | None = None) -> list[dict[str, Any]]:
        """Chat messages in transformers' multimodal format; images go to the first user turn."""
        out = []
        for i, (role, text) in enumerate(self.turns[:upto]):
            content: list[dict[str, Any]] = []
            if i == 0:
                content += [{"type": "image"} for _ in self.images]
            content.append({"type": "text", "text": text})
            out.append({"role": role, "content": content})
        return out

    @property
    def question(self) -> str:
        return self.turns[0][1]

    @property
    def answer(self) -> str:
        return self.turns[1][1]


def load_samples(path: Path) -> list[Sample]:
    """Read and validate a LLaVA-format JSON file; the first bad entry is a UserError naming it."""
    entries, problems, _ = read_entries(path)
    if problems:
        more = f" (and {len(problems) - 1} more; run `edgetune data check {path} --recipe RECIPE` for all)" if len(problems) > 1 else ""
        raise UserError(problems[0] + more)
    return [sample for _, sample in entries]


def read_entries(path: Path) -> tuple[list[tuple[int, Sample]], list[str], int]:
    """(entry index, Sample) for every valid entry of a LLaVA-format JSON file, one line per invalid
    entry or repeated id naming the file, the entry's index and id, and the fix, and the number of
    entries. A file that is not a JSON list at all is a UserError."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: data file does not exist") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(raw, list) or not raw:
        raise UserError(f"{path}: expected a non-empty JSON list of LLaVA-format entries")
    entries, problems, first_of_id = [], [], {}
    for i, entry in enumerate(raw):
        try:
            entries.append((i, _parse_entry(entry, i, path)))
        except UserError as err:
            problems.append(str(err))
        if isinstance(entry, dict) and isinstance(entry.get("id"), (str, int)):
            if entry["id"] in first_of_id:
                problems.append(
                    f"{path}: entry {i} (id {entry['id']}): entry {first_of_id[entry['id']]} has the same id; give every entry its own id"
                )
            first_of_id.setdefault(entry["id"], i)
    return entries, problems, len(raw)


def _parse_entry(entry: Any, index: int, path: Path) -> Sample:
    where = f"{path}: entry {index}"
    if not isinstance(entry, dict):
        raise UserError(f"{where}: expected an object with id, image, conversations")
    where = f"{path}: entry {index} (id {entry.get('id', '?')})"
    image_field = entry.get("image")
    if not image_field:
        raise UserError(f"{where}: no 'image'; every entry needs an image path relative to {path.name}")
    names = image_field if isinstance(image_field, list) else [image_field]
    images = [_check_image(path.parent / str(name), where) for name in names]
    conversations = entry.get("conversations")
    if not isinstance(conversations, list) or len(conversations) < 2:
        raise UserError(f"{where}: 'conversations' must be a list of at least one human and one gpt turn")
    turns = []
    placeholders = 0
    for j, turn in enumerate(conversations):
        role = ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
        if role is None or not isinstance(turn.get("value"), str):
            raise UserError(f"{where}: conversations[{j}] needs 'from' (human|gpt) and a string 'value'")
        expected = "user" if j % 2 == 0 else "assistant"
        if j == 0 and role != expected:
            raise UserError(f"{where}: conversations[0] is from '{turn['from']}'; the first turn must be the human's question")
        if role != expected:
            raise UserError(f"{where}: conversations[{j}] is from '{turn['from']}', expected turns to alternate human, gpt, ...")
        text = turn["value"]
        if role == "assistant" and not text.strip():
            raise UserError(f"{where}: conversations[{j}] is an empty answer; write the answer or drop the turn")
        if role == "assistant" and IMAGE_PLACEHOLDER in text:
            raise UserError(f"{where}: conversations[{j}] (an answer) contains '<image>'; images go in the first human turn")
        placeholders += text.count(IMAGE_PLACEHOLDER)
        if role == "user":
            text = text.replace(IMAGE_PLACEHOLDER, "").strip()
        turns.append((role, text))
    if placeholders != len(images):
        raise UserError(
            f"{where}: {placeholders} '<image>' placeholder(s) in the conversation but {len(images)} image(s); "
            "put exactly one '<image>' per image in the first human turn"
        )
    if turns[-1][0] != "assistant":
        turns = turns[:-1]
    return Sample(str(entry.get("id", index)), images, turns)


def _check_image(path: Path, where: str) -> Path:
    if not path.is_file():
        raise UserError(f"{where}: image {path} does not exist")
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as err:  # PIL raises many types for corrupt files
        raise UserError(f"{where}: image {path} cannot be read ({type(err).__name__}); replace or remove it") from None
    return path.resolve()


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of the image at ``path`` as open_image delivers it, from the file's header:
    EXIF orientations 5-8 (a quarter turn) swap them. PNG keeps its eXIf chunk before the pixels, so
    a PNG without one in its header is read as upright rather than decoded to look further."""
    with Image.open(path) as image:
        width, height = image.size
        if image.format == "PNG" and "exif" not in image.info:
            return width, height
        turned = image.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)
    return (height, width) if turned else (width, height)


def open_image(path: Path) -> Image.Image:
    """The image at ``path`` as 8-bit RGB, by edgetune.runtime.preprocess.open_image's rule (EXIF
    orientation, 16-bit grey scaled, transparency on white): what the runtime reads on device."""
    from edgetune.runtime.preprocess import open_image as read_rgb

    return read_rgb(path)


def prompt_text(processor: Any, sample: Sample, upto: int = 1) -> str:
    """The text the model sees before it answers turn ``upto`` (generation prompt included)."""
    return processor.apply_chat_template(sample.messages(upto), add_generation_prompt=True)


def encode_sample(processor: Any, sample: Sample, max_length: int) -> dict[str, Any]:
    """input_ids, labels (-100 outside assistant turns) and the processor's image tensors."""
    import torch

    pieces: list[tuple[str, bool]] = []  # (text, is_assistant)
    rendered = ""
    for i, (role, _) in enumerate(sample.turns):
        if role != "assistant":
            continue
        prompt = prompt_text(processor, sample, i)
        full = processor.apply_chat_template(sample.messages(i + 1))
        if not prompt.startswith(rendered) or not full.startswith(prompt):
            raise UserError("the model's chat template does not render conversations prefix by prefix; edgetune cannot mask the prompt")
        pieces += [(prompt[len(rendered):], False), (full[len(prompt):], True)]
        rendered = full
    images = [open_image(p) for p in sample.images]
    # channels_last: a 1- or 3-pixel-high image would otherwise be read as channels-first.
    first = processor(text=[pieces[0][0]], images=images or None, input_data_format="channels_last", return_tensors="pt")
    ids = [first["input_ids"][0]]
    labels = [torch.full_like(ids[0], -100)]
    tokenizer = getattr(processor, "tokenizer", processor)
    for text, is_assistant in pieces[1:]:
        piece = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        ids.append(piece)
        labels.append(piece.clone() if is_assistant else torch.full_like(piece, -100))
    input_ids, label_ids = torch.cat(ids), torch.cat(labels)
    extras = {k: v for k, v in first.items() if k not in ("input_ids", "attention_mask")}
    return cut_to_max_length({"input_ids": input_ids, "labels": label_ids, **extras}, max_length, sample.id)


PER_TOKEN_KEYS = ("input_ids", "labels", "token_type_ids")  # what cut_to_max_length shortens


def cut_to_max_length(encoded: dict[str, Any], max_length: int, sample_id: str) -> dict[str, Any]:
    """An encoded sample cut to its first ``max_length`` tokens, as training reads it: the answer
    tokens past the cut are not trained on. Images come first in the prompt, so a cut that leaves
    any answer token leaves every image token. A sample with no answer token left is a UserError
    (``edgetune data check`` lists every such entry, and counts the partly cut ones, beforehand)."""
    from edgetune.train import answer_mask

    length = len(encoded["input_ids"])
    if length <= max_length:
        return encoded
    if not answer_mask(encoded["labels"][:max_length]).any():
        raise UserError(
            f"sample {sample_id}: {length} tokens (image tokens included) exceed data.max_length={max_length}, which cuts its "
            f"answer entirely; raise data.max_length to {length}, or shrink the images or shorten the prompt"
        )
    return {k: v[:max_length] if k in PER_TOKEN_KEYS else v for k, v in encoded.items()}


def collate(batch: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-pad to the longest sample. Other tensors the same length as input_ids (PaliGemma's
    token_type_ids) are right-padded with 0; image tensors are concatenated along dim 0 (one row
    per image, or per patch for dynamic-resolution families), zero-padded first where their other
    dims differ between samples (tile or crop counts), which the models read as padding images."""
    import torch

    length = max(len(b["input_ids"]) for b in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        input_ids[i, :n], labels[i, :n], attention_mask[i, :n] = b["input_ids"], b["labels"], 1
    out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    for key in batch[0]:
        if key in out:
            continue
        tensors = [b[key] for b in batch]
        if all(t.dim() == 1 and len(t) == len(b["input_ids"]) for t, b in zip(tensors, batch)):
            out[key] = torch.stack([pad_to(t, (length,)) for t in tensors])
        else:
            shape = [max(sizes) for sizes in zip(*(t.shape[1:] for t in tensors))]
            out[key] = torch.cat([pad_to(t, (len(t), *shape)) for t in tensors])
    return out


def pad_to(tensor: Any, shape: tuple[int, ...]) -> Any:
    """``tensor`` zero-padded at the end of each dim to ``shape``."""
    import torch

    if tuple(tensor.shape) == tuple(shape):
        return tensor
    out = torch.zeros(shape, dtype=tensor.dtype)
    out[tuple(slice(0, n) for n in tensor.shape)] = tensor
    return out


def normalize_answer(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".!?").split())
