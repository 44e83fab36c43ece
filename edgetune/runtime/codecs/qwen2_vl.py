"""Qwen2-VL / Qwen2.5-VL images, torch-free: dynamic-resolution patches, the vision tower's index
arithmetic, and 3-D multimodal RoPE (M-RoPE) positions for the decoder.

Written by hand because the runtime imports no torch; each function reproduces one piece of
transformers 4.57 exactly, and the export parity check compares the result with PyTorch:

    patches                Qwen2VLImageProcessor (slow): smart_resize to multiples of
                           patch * merge within [min_pixels, max_pixels], PIL resize, rescale,
                           normalize, flatten to [t*h*w, 3 * temporal_patch * patch * patch]
    rotary_position_ids    the (row, column) of each patch, as the vision tower's rot_pos_emb indexes
    window_layout          Qwen2.5-VL's get_window_index: the order of merged tokens window by
                           window, and which window each patch then belongs to
    mrope_positions        Qwen2VLModel.get_rope_index: text advances t, h, w together, an image's
                           tokens take its grid coordinates; rope_deltas carry the offset to the
                           decode steps (position = past length + delta)

vision.onnx runs once per image, so that no data-dependent shape reaches the graph: it takes the
patches, their rotary ids and (Qwen2.5-VL) the window order and windows, and returns the image's
tokens [t*h*w / merge**2, hidden].
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from edgetune.errors import UserError
from edgetune.runtime.codecs.base import Codec, EncodedImage
from edgetune.runtime.preprocess import RESAMPLE


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) rounded to multiples of ``factor`` with the pixel count in [min_pixels,
    max_pixels], the aspect ratio kept as closely as possible (transformers' smart_resize)."""
    if max(height, width) / min(height, width) > 200:
        raise UserError(f"image of {width}x{height}: Qwen2-VL needs an aspect ratio below 200")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patches(image: Image.Image, params: dict) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One image -> (float32 patches [t*h*w, 3 * temporal_patch * patch * patch], grid (t, h, w))."""
    if params["convert_rgb"] or image.mode != "RGB":  # the vision graph takes 3 channels either way
        image = image.convert("RGB")
    patch, merge, temporal = params["patch_size"], params["merge_size"], params["temporal_patch_size"]
    height, width = image.height, image.width
    if params["resize"]:
        height, width = smart_resize(height, width, patch * merge, params["min_pixels"], params["max_pixels"])
        image = image.resize((width, height), RESAMPLE[params["resample"]])
    pixels = np.asarray(image)
    if params["rescale_factor"] is not None:
        pixels = (pixels.astype(np.float64) * params["rescale_factor"]).astype(np.float32)
    pixels = pixels.astype(np.float32)
    if params["mean"] is not None:
        pixels = (pixels - np.asarray(params["mean"], np.float32)) / np.asarray(params["std"], np.float32)
    # One frame, repeated to fill the temporal patch, cut into merge x merge blocks of patches.
    frames = np.repeat(pixels.transpose(2, 0, 1)[None], temporal, axis=0)
    grid_h, grid_w = height // patch, width // patch
    blocks = frames.reshape(1, temporal, 3, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
    blocks = blocks.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(blocks.reshape(grid_h * grid_w, 3 * temporal * patch * patch)), (1, grid_h, grid_w)


def rotary_position_ids(grid: tuple[int, int, int], merge: int) -> np.ndarray:
    """int64 [t*h*w, 2]: each patch's (row, column) in the processor's patch order."""
    t, h, w = grid
    rows = np.broadcast_to(np.arange(h)[:, None], (h, w))
    cols = np.broadcast_to(np.arange(w)[None, :], (h, w))
    ids = [grid_ids.reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3).reshape(-1) for grid_ids in (rows, cols)]
    return np.tile(np.stack(ids, axis=-1), (t, 1)).astype(np.int64)


def window_layout(grid: tuple[int, int, int], merge: int, patch: int, window_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2.5-VL's windows for one image: (window_index int64 [tokens]: the merged tokens in
    window order; window_segments int64 [t*h*w]: the window of each patch in that order)."""
    t, h, w = grid
    side = window_size // merge // patch  # a window's side in merged tokens
    token_h, token_w = h // merge, w // merge
    pad_h, pad_w = side - token_h % side, side - token_w % side
    index = np.full((t, token_h + pad_h, token_w + pad_w), -100, dtype=np.int64)
    index[:, :token_h, :token_w] = np.arange(t * token_h * token_w).reshape(t, token_h, token_w)
    windows_h, windows_w = (token_h + pad_h) // side, (token_w + pad_w) // side
    index = index.reshape(t, windows_h, side, windows_w, side).transpose(0, 1, 3, 2, 4).reshape(-1, side * side)
    sizes = (index != -100).sum(axis=1)
    order = index[index != -100]
    return order, np.repeat(np.arange(len(sizes)), sizes * merge * merge).astype(np.int64)


def mrope_positions(
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    grids: list[tuple[int, int, int]],
    image_token_id: int,
    vision_start_token_id: int,
    merge: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(position_ids int64 [3, batch, seq], rope_deltas int64 [batch, 1]) for a prompt whose images
    have ``grids`` in reading order; padding gets position 1, as get_rope_index gives it."""
    batch, seq = input_ids.shape
    positions = np.ones((3, batch, seq), dtype=np.int64)
    deltas = np.zeros((batch, 1), dtype=np.int64)
    remaining = iter(grids)
    for row in range(batch):
        real = attention_mask[row] == 1
        tokens = input_ids[row][real].tolist()
        starts = [i for i, token in enumerate(tokens[:-1]) if token == vision_start_token_id]
        images = sum(tokens[i + 1] == image_token_id for i in starts)
        pieces, start = [], 0
        for _ in range(images):
            end = tokens.index(image_token_id, start)
            t, h, w = next(remaining)
            h, w = h // merge, w // merge
            offset = pieces[-1].max() + 1 if pieces else 0
            pieces.append(np.broadcast_to(np.arange(end - start), (3, end - start)) + offset)
            grid = np.stack(np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")).reshape(3, -1)
            pieces.append(grid + end - start + offset)
            start = end + t * h * w
        if start < len(tokens):
            offset = pieces[-1].max() + 1 if pieces else 0
            pieces.append(np.broadcast_to(np.arange(len(tokens) - start), (3, len(tokens) - start)) + offset)
        row_positions = np.concatenate(pieces, axis=1)
        positions[:, row, real] = row_positions
        deltas[row] = row_positions.max() + 1 - seq
    return positions, deltas


class Qwen2VLCodec(Codec):
    """manifest image: token, token_id, vision_start_token_id, preprocess (patches' params),
    window_size (Qwen2.5-VL; null for Qwen2-VL)."""

    def encode(self, image: Image.Image) -> EncodedImage:
        params = self.image["preprocess"]
        pixel_values, grid = patches(image, params)
        feeds = {"pixel_values": pixel_values, "rotary_position_ids": rotary_position_ids(grid, params["merge_size"])}
        if self.image["window_size"]:
            feeds["window_index"], feeds["window_segments"] = window_layout(
                grid, params["merge_size"], params["patch_size"], self.image["window_size"]
            )
        tokens = int(np.prod(grid)) // params["merge_size"] ** 2
        return EncodedImage(feeds, tokens, {"grid": grid})

    def positions(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, images: list[EncodedImage] | None, state: dict
    ) -> np.ndarray:
        """The prompt step computes 3-D positions and keeps rope_deltas in ``state``; a later step
        continues from them: past length + delta + i on all three axes (as generate does)."""
        batch, seq = input_ids.shape
        if "rope_deltas" not in state:
            positions, state["rope_deltas"] = mrope_positions(
                input_ids,
                attention_mask[:, -seq:],
                [image.info["grid"] for image in images or []],
                self.image["token_id"],
                self.image["vision_start_token_id"],
                self.image["preprocess"]["merge_size"],
            )
            return positions
        past = attention_mask.shape[1] - seq
        steps = np.arange(seq, dtype=np.int64)[None, :] + past + state["rope_deltas"]
        return np.ascontiguousarray(np.broadcast_to(steps, (3, batch, seq)))
