"""OnnxVLM: answer a prompt about an image with a bundle's three ONNX graphs, torch-free.

Contract: with temperature 0, ``generate_ids`` returns the same new token ids as transformers'
``model.generate(do_sample=False)`` on the model the bundle was exported from (checked token for
token in tests/test_runtime.py), including the eos token when one ends the answer. Sampling
(temperature > 0, top-p) draws from numpy's generator, so a seed reproduces the answer.

One step of the model is ``forward``: embed.onnx on the ids, vision.onnx on each image, the image
embeddings written into the image-token rows, then decoder.onnx with the KV cache. The cache is a
dict of numpy arrays keyed by the decoder's past input names; each step's ``present.*`` outputs
become the next step's ``past_key_values.*`` inputs. Other keys in that dict are per-generation
state (LLaMA-Adapter's image feature, a codec's M-RoPE offsets) carried to the next step.

A decoder whose every layer is onnxruntime's GroupQueryAttention (edgetune.export.fusions) can
instead keep its cache in place: ``kv_buffer`` preallocates [batch, kv_heads, capacity, head_dim]
per layer; the prompt's cache is copied in once, and each later step binds the buffer (IOBinding)
as both the past input and the present output, so that it writes its new key and value into the
buffer and copies nothing else (GroupQueryAttention's shared past/present buffer, the layout
onnxruntime-genai decodes with). Generation uses it when the bundle allows; the answers are the
same, bit for bit.

What differs between families at the image boundary (preprocessing, the image's text in the
prompt, position ids, extra decoder inputs) is the codec's (edgetune.runtime.codecs), chosen by
the manifest's image.codec.

A bundle from prefix tuning carries a constant KV prefix (manifest "kv_prefix"): the empty cache
is that prefix rather than nothing, the decoder's mask gets as many always-visible columns in
front, and positions count real tokens only. Callers never see it: the masks they pass and the
positions they get cover their own tokens.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from edgetune.errors import UserError
from edgetune.runtime import preprocess
from edgetune.runtime.bundle import GRAPH_NAMES, LOGITS_TO_KEEP, MANIFEST_FILE, PADDED_ROWS, REEXPORT, load_manifest
from edgetune.runtime.codecs import EncodedImage, get_codec

ImageInput = Path | str | Image.Image
IMAGE_FEATURE = "image_feature"
IN_PLACE = "kv_in_place"  # marks a past dict whose arrays are kv_buffer's preallocated buffers
PROMPT_IMAGE_PLACEHOLDER = "<image>"  # removed from prompts, as edgetune.data removes it from user turns
IMAGE_TOKEN_NAME = re.compile(r"image|img|vision|video|row_\d+_col_\d+", re.IGNORECASE)  # the last: idefics3's tiles


class OnnxVLM:
    """A loaded bundle: three onnxruntime sessions, the tokenizer and the manifest. Use ``load``."""

    def __init__(self, manifest: dict, sessions: dict[str, ort.InferenceSession], tokenizer: Tokenizer,
                 kv_prefix: dict[str, np.ndarray] | None = None):
        self.manifest = manifest
        self.codec = get_codec(manifest)
        self.sessions = sessions
        self.tokenizer = tokenizer
        decoder = manifest["graphs"]["decoder"]
        past_inputs = [value for value in decoder["inputs"] if value["name"].startswith("past_key_values.")]
        self.past_names = [value["name"] for value in past_inputs]
        self.past_dtype = np.dtype(past_inputs[0]["dtype"])
        # LLaMA-Adapter's visual prompt: the image's mean embedding, fed on every decoder step.
        self.feeds_image_feature = any(value["name"] == IMAGE_FEATURE for value in decoder["inputs"])
        self.eos_token_ids = set(manifest["tokenizer"]["eos_token_ids"])
        # A decoder with onnxruntime's fused attention assumes right padding: padded rows run alone.
        self.rows_alone = manifest["text"].get("padded_rows") == PADDED_ROWS
        # GroupQueryAttention in every layer reads the cache length from the positions, not from the
        # past's shape: the cache can be a preallocated buffer written in place.
        fused = manifest.get("decoder_fusions", {})
        self.in_place_cache = fused.get("gqa") == manifest["text"]["num_layers"] and not kv_prefix
        # Bundles from before it compute every position's logits; forward then slices them.
        self.takes_logits_to_keep = any(value["name"] == LOGITS_TO_KEEP for value in decoder["inputs"])
        outputs = [value["name"] for value in decoder["outputs"]]
        self.present_names = [name for name in outputs if name.startswith("present.")]
        self.kv_prefix = kv_prefix or {}  # past input name -> [kv_heads, length, head_dim]
        self.prefix_length = next(iter(self.kv_prefix.values())).shape[1] if self.kv_prefix else 0
        # Special tokens a user's prompt must not hold: those of the image's text (per image, in
        # user_text), the image section's own (image.token, idefics3's tile and global tokens), and
        # any named for images or video (Qwen2-VL's <|vision_start|>, <|video_pad|>, idefics3's <row_1_col_2>).
        self.special_tokens = [t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special]
        named = [value for value in manifest["image"].values() if isinstance(value, str)]
        self.image_tokens = {token for token in self.special_tokens if token in named or IMAGE_TOKEN_NAME.search(token)}
        missing = [name for name in self.past_names if self.kv_prefix and name not in self.kv_prefix]
        if missing:
            raise UserError(f"{manifest['kv_prefix']['file']} has no tensor {missing[0]}; {REEXPORT}")

    @classmethod
    def load(cls, bundle_dir: Path | str, threads: int | None = None, model_format: str = "auto") -> OnnxVLM:
        """Open a bundle on CPU; ``threads`` caps onnxruntime's intra-op threads (None: all cores).

        model_format: "onnx" loads the .onnx graphs, "ort" the ORT-format ones (manifest "ort"),
        "auto" the ORT-format ones when the bundle has them. Both answer alike.
        """
        bundle_dir = Path(bundle_dir)
        manifest = load_manifest(bundle_dir)
        if model_format not in ("auto", "onnx", "ort"):
            raise UserError(f"model_format {model_format!r}: use 'auto', 'onnx' or 'ort'")
        if model_format == "ort" and not manifest.get("ort"):
            raise UserError(f"{bundle_dir / MANIFEST_FILE} has no 'ort' section (no ORT-format graphs); "
                            "re-run `edgetune export` with --ort, or load the .onnx graphs (model_format 'onnx' or 'auto')")
        use_ort = bool(manifest.get("ort")) and model_format != "onnx"
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: ORT warns about unused initializers
        if threads is not None:
            options.intra_op_num_threads = threads
        sessions = {}
        for name in GRAPH_NAMES:
            path = bundle_dir / (manifest["ort"]["graphs"][name] if use_ort else manifest["graphs"][name]["file"])
            data_files = [] if use_ort else [bundle_dir / data for data in manifest["graphs"][name].get("data_files", [])]
            try:
                sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            except Exception as err:  # onnxruntime raises several unrelated types for a bad file
                raise graph_load_error(path, data_files, err) from None
        tokenizer_path = bundle_dir / manifest["tokenizer"]["file"]
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as err:
            raise UserError(f"{tokenizer_path} is not a tokenizers file ({err}); {REEXPORT}") from None
        kv_prefix = load_kv_prefix(bundle_dir / manifest["kv_prefix"]["file"]) if manifest.get("kv_prefix") else None
        return cls(manifest, sessions, tokenizer, kv_prefix)

    # ---- prompt and image -> model inputs -------------------------------------------------------

    def encode_image(self, image: ImageInput) -> EncodedImage:
        """One image (a path or a PIL image) -> the vision graph's inputs and its token count."""
        return self.codec.encode(preprocess.open_image(image))

    def prompt_ids(self, prompt: str, image: EncodedImage) -> list[int]:
        """The single-turn chat prompt for ``prompt`` about one image, as token ids.

        The manifest's pre-rendered template is split at the image placeholder, {prompt} filled in,
        and the placeholder replaced by the codec's text for this image, as the HF processor does.
        """
        prompt = self.user_text(prompt, image)
        spec = self.manifest["prompt"]
        before, after = spec["single_turn"].split(spec["image_placeholder"], 1)
        text = before.replace("{prompt}", prompt) + self.codec.image_text(image) + after.replace("{prompt}", prompt)
        add_special_tokens = self.manifest["tokenizer"]["add_special_tokens"]
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def user_text(self, prompt: str, image: EncodedImage) -> str:
        """The prompt as the data loader reads a user turn: "<image>" placeholders removed (the image
        has its one place in the template). Raises UserError for a prompt that holds one of the
        bundle's image tokens, which the model would take for part of an image (an <|image_pad|>
        too many is an image row no image embedding fills)."""
        prompt = prompt.replace(PROMPT_IMAGE_PLACEHOLDER, "").strip()
        image_text = self.codec.image_text(image)
        for token in self.special_tokens:
            if token in prompt and (token in self.image_tokens or token in image_text):
                raise UserError(
                    f"prompt {shorten(prompt)!r} contains {token!r}, one of the {self.manifest['family']} bundle's image "
                    "tokens; remove it (the runtime puts the image's tokens into the prompt itself)"
                )
        return prompt

    def image_embeds(self, images: list[EncodedImage]) -> list[np.ndarray]:
        """vision.onnx on each image: [tokens, hidden] per image."""
        return [self.codec.embeds(self.sessions["vision"], image) for image in images]

    # ---- one model step ------------------------------------------------------------------------

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """The cache before the first token: empty, or the bundle's KV prefix for every row."""
        if self.kv_prefix:
            return {name: np.repeat(self.kv_prefix[name][None].astype(self.past_dtype), batch, axis=0)
                    for name in self.past_names}
        text = self.manifest["text"]
        shape = (batch, text["num_kv_heads"], 0, text["head_dim"])
        return {name: np.zeros(shape, self.past_dtype) for name in self.past_names}

    def kv_buffer(self, batch: int, capacity: int) -> dict[str, np.ndarray | bool] | None:
        """An empty cache preallocated for ``capacity`` positions that the decoder reads and writes in
        place, for ``forward``'s ``past`` (None when this bundle's decoder cannot: see the module
        docstring): per layer [batch, kv_heads, capacity, head_dim], flagged by the key IN_PLACE. A
        forward step writes into it: pass on only the newest cache ``forward`` returns."""
        if not self.in_place_cache:
            return None
        text = self.manifest["text"]
        shape = (batch, text["num_kv_heads"], capacity, text["head_dim"])
        return {IN_PLACE: True, **{name: np.zeros(shape, self.past_dtype) for name in self.past_names}}

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        past: dict[str, np.ndarray] | None = None,
        images: list[EncodedImage] | None = None,
        logits_to_keep: int = 0,
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One pass over new tokens: (logits [batch, seq, vocab], present cache and state).

        input_ids [batch, seq] are the new tokens; attention_mask [batch, past + seq] covers the
        cached and the new ones (0 = padding). ``images`` fill the image tokens of input_ids in
        reading order (row by row). ``logits_to_keep`` > 0 returns the logits of the last that many
        positions only ([batch, logits_to_keep, vocab]), which the LM head then skips computing.
        """
        input_ids = np.asarray(input_ids, dtype=np.int64)
        attention_mask = np.asarray(attention_mask, dtype=np.int64)
        if self.rows_alone and len(input_ids) > 1 and not attention_mask.all():
            if past and past.get(IN_PLACE):
                raise ValueError("a kv_buffer cache takes unpadded batches; pass past=None for a padded one")
            return self._forward_rows(input_ids, attention_mask, past, images, logits_to_keep)
        past = self.empty_past(len(input_ids)) if past is None else past
        state = {key: value for key, value in past.items() if key not in self.past_names}
        (embeds,) = self.sessions["embed"].run(None, {"input_ids": input_ids})
        if images:
            per_image = self.image_embeds(images)
            embeds = replace_image_tokens(embeds, input_ids, np.concatenate(per_image), self.manifest["image"]["token_id"])
            if self.feeds_image_feature:
                state[IMAGE_FEATURE] = image_feature(per_image, len(input_ids))
        elif self.feeds_image_feature and IMAGE_FEATURE not in state:
            raise UserError("this bundle's decoder needs the image: pass images on the first step")
        position_ids = self.codec.positions(input_ids, attention_mask, images, state)
        extras = self.codec.decoder_feeds(input_ids, attention_mask, state)
        if self.kv_prefix:
            attention_mask = np.concatenate([np.ones((len(attention_mask), self.prefix_length), np.int64), attention_mask], axis=1)
        feed = {"inputs_embeds": embeds, "attention_mask": attention_mask, "position_ids": position_ids, **extras}
        if self.feeds_image_feature:
            feed[IMAGE_FEATURE] = state[IMAGE_FEATURE]
        if self.takes_logits_to_keep:
            feed[LOGITS_TO_KEEP] = np.array(logits_to_keep, np.int64)
        if state.get(IN_PLACE):
            logits = self._run_in_place(feed, past, input_ids.shape[1])
            present = {name: past[name] for name in self.past_names}
        else:
            feed.update((name, past[name]) for name in self.past_names)
            logits, *cache = self.sessions["decoder"].run(None, feed)
            present = dict(zip(self.past_names, cache))
        if logits_to_keep and logits.shape[1] > logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return logits, {**present, **state}

    def _run_in_place(self, feed: dict[str, np.ndarray], cache: dict[str, np.ndarray], seq: int) -> np.ndarray:
        """decoder.onnx on a ``kv_buffer`` cache. The prompt (an empty buffer) runs as usual, and its
        cache is copied in once; every later step binds each layer's buffer as both its past input and
        its present output (IOBinding), so GroupQueryAttention appends in place. IOBinding cannot bind
        ``logits_to_keep`` (an initializer-backed input): those steps get every position's logits."""
        total, capacity = feed["attention_mask"].shape[1], cache[self.past_names[0]].shape[2]
        if total > capacity:
            raise ValueError(f"{total} positions do not fit a KV buffer of {capacity}")
        if total == seq:
            feed.update((name, cache[name][:, :, :0]) for name in self.past_names)
            logits, *present = self.sessions["decoder"].run(None, feed)
            for name, value in zip(self.past_names, present):
                cache[name][:, :, :seq] = value
            return logits
        binding = self.sessions["decoder"].io_binding()
        for name, value in feed.items():
            if name != LOGITS_TO_KEEP:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        binding.bind_output("logits")
        for past_name, present_name in zip(self.past_names, self.present_names):
            buffer = cache[past_name]
            binding.bind_cpu_input(past_name, buffer)
            binding.bind_output(present_name, "cpu", 0, buffer.dtype, list(buffer.shape), buffer.ctypes.data)
        self.sessions["decoder"].run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    def _forward_rows(self, input_ids, attention_mask, past, images, logits_to_keep):
        """``forward`` on a padded batch, one row at a time without its padding (for a decoder that
        assumes right padding; see edgetune.export.fusions). Results are laid out as the batched call
        lays them out: logits of padding positions are 0, cached padding positions hold zeros. State
        arrays (a codec's, the image feature) are per row along their first axis."""
        batch, seq = input_ids.shape
        prefix = self.prefix_length
        past = self.empty_past(batch) if past is None else past
        images = list(images or [])
        token_id = self.manifest["image"]["token_id"]
        logits, present, states = None, {}, []
        for row in range(batch):
            real = attention_mask[row] == 1
            cached = np.concatenate([np.ones(prefix, bool), real[: len(real) - seq]])
            ids = input_ids[row : row + 1, real[-seq:]]
            row_images = []
            while images and sum(image.tokens for image in row_images) < int((ids == token_id).sum()):
                row_images.append(images.pop(0))
            row_past = {name: value[row : row + 1][:, :, cached] if name in self.past_names else value[row : row + 1]
                        for name, value in past.items()}
            out, row_present = self.forward(ids, np.ones((1, int(real.sum())), np.int64), row_past, row_images or None,
                                            logits_to_keep)
            if logits is None:
                logits = np.zeros((batch, logits_to_keep or seq, out.shape[-1]), out.dtype)
            if logits_to_keep:  # the last positions are real in every row of a left-padded batch
                logits[row, -out.shape[1]:] = out[0]
            else:
                logits[row, real[-seq:]] = out[0]
            kept = np.concatenate([np.ones(prefix, bool), real])
            for name in self.past_names:
                cache = row_present[name]
                if name not in present:
                    present[name] = np.zeros((batch, cache.shape[1], len(kept), cache.shape[3]), cache.dtype)
                present[name][row, :, kept] = cache[0].transpose(1, 0, 2)
            states.append({key: value for key, value in row_present.items() if key not in self.past_names})
        state = {key: np.concatenate([s[key] for s in states]) for key in states[0]}
        return logits, {**present, **state}

    # ---- decoding ------------------------------------------------------------------------------

    def generate_ids(
        self,
        image: ImageInput,
        prompt: str,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[int]:
        """The new token ids (eos included when it ends the answer)."""
        return list(self._new_token_ids(image, prompt, max_new_tokens, temperature, top_p, seed))

    def stream(
        self,
        image: ImageInput,
        prompt: str,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> Iterator[str]:
        """Yield the answer's text as it is produced (see stream_text)."""
        tokens = self._new_token_ids(image, prompt, max_new_tokens, temperature, top_p, seed)
        yield from stream_text(self.tokenizer, tokens)

    def generate(
        self,
        image: ImageInput,
        prompt: str,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> str:
        """The whole answer's text (special tokens such as eos left out)."""
        return "".join(self.stream(image, prompt, max_new_tokens, temperature, top_p, seed))

    def _new_token_ids(self, image, prompt, max_new_tokens, temperature, top_p, seed) -> Iterator[int]:
        if temperature < 0 or not 0 < top_p <= 1:
            raise UserError(f"temperature must be >= 0 and top_p in (0, 1]; got {temperature} and {top_p}")
        encoded = self.encode_image(image)
        input_ids = np.array([self.prompt_ids(prompt, encoded)], dtype=np.int64)
        mask = np.ones_like(input_ids)
        past = self.kv_buffer(1, input_ids.shape[1] + max_new_tokens)
        logits, past = self.forward(input_ids, mask, past, images=[encoded], logits_to_keep=1)
        rng = np.random.default_rng(seed)
        for produced in range(1, max_new_tokens + 1):
            token = next_token(logits[0, -1], temperature, top_p, rng)
            yield token
            if token in self.eos_token_ids or produced == max_new_tokens:
                return  # no decoder step for a token nobody will read
            mask = np.concatenate([mask, np.ones((1, 1), dtype=np.int64)], axis=1)
            logits, past = self.forward(np.array([[token]]), mask, past)


def shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def graph_load_error(path: Path, data_files: list[Path], err: Exception) -> UserError:
    """onnxruntime's refusal of a graph, on one line; it names the .onnx.data file when what failed
    is reading an initializer's bytes from it (a truncated or mismatched weights file)."""
    reason = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", " ".join(str(err).split()))
    if data_files and "External initializer" in reason:
        reason = reason[reason.index("External initializer"):]
        names = " or ".join(str(data) for data in data_files)
        return UserError(f"{names} is truncated or does not match {path.name} ({shorten(reason, 160)}); {REEXPORT}")
    return UserError(f"{path} cannot be loaded by onnxruntime ({shorten(reason, 160)}); {REEXPORT}")


def image_feature(per_image: list[np.ndarray], batch: int) -> np.ndarray:
    """[batch, hidden]: each image's mean embedding; the decoder input needs one image per row."""
    if len(per_image) != batch:
        raise UserError(f"this bundle (visual prompt) needs one image per prompt; got {len(per_image)} for {batch}")
    return np.stack([embeds.mean(axis=0, dtype=np.float32) for embeds in per_image])


def load_kv_prefix(path: Path) -> dict[str, np.ndarray]:
    """kv_prefix.safetensors -> {past input name: [kv_heads, length, head_dim]}."""
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error type for a corrupt header
        raise UserError(f"{path} is not a safetensors file ({err}); {REEXPORT}") from None


def stream_text(tokenizer: Tokenizer, token_ids: Iterable[int]) -> Iterator[str]:
    """Text pieces for token ids as they arrive. The pieces join to ``tokenizer.decode(ids,
    skip_special_tokens=True)``; no piece ends inside a UTF-8 character that a later token may complete."""
    decoded = DecodeStream(skip_special_tokens=True)  # holds back bytes of an unfinished character
    ids, text = [], ""
    for token in token_ids:
        ids.append(token)
        piece = decoded.step(tokenizer, token)
        if piece:
            text += piece
            yield piece
    # Bytes still held back can no longer be completed: emit them as decode() renders them (U+FFFD).
    rest = tokenizer.decode(ids, skip_special_tokens=True)[len(text) :]
    if rest:
        yield rest


def replace_image_tokens(
    embeds: np.ndarray, input_ids: np.ndarray, image_embeds: np.ndarray, token_id: int
) -> np.ndarray:
    """LLaVA's merge: the k-th image-token row (reading order) gets the k-th image embedding."""
    rows = input_ids == token_id
    flat = image_embeds.reshape(-1, image_embeds.shape[-1])
    if rows.sum() != len(flat):
        raise ValueError(f"{rows.sum()} image tokens in the prompt but {len(flat)} image embeddings")
    merged = embeds.copy()
    merged[rows] = flat.astype(embeds.dtype)
    return merged


def next_token(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy at temperature 0; else sample from the smallest top-probability set whose mass reaches top_p."""
    if temperature == 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    mass_before = np.cumsum(probs[order]) - probs[order]
    kept = order[mass_before < top_p]  # always keeps the most likely token
    return int(rng.choice(kept, p=probs[kept] / probs[kept].sum()))
