"""Idefics3 / SmolVLM images: tiles of one size plus a global view, a structured text per image.

Reproduces transformers' slow Idefics3ImageProcessor (== SmolVLMImageProcessor) with PIL and
numpy, step by step: resize the longest edge to ``longest_edge`` (the short side rounded up to
even, both capped at 4096), resize again so both sides are multiples of ``tile_size``, cut that
grid into tiles row by row and append the whole grid resized to one tile; then rescale and
normalise each frame as CLIPImageProcessor does. Without splitting the image is resized straight
to one tile. Images arrive as preprocess.open_image's 8-bit RGB, as in training. The export parity
check compares the result with the HF processor; the family's tests check it to 1e-6.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from edgetune.runtime import preprocess
from edgetune.runtime.codecs.base import Codec, EncodedImage

MAX_IMAGE_SIZE = 4096  # the processor's cap on either side after the first resize


class Idefics3Codec(Codec):
    def encode(self, image: Image.Image) -> EncodedImage:
        frames, rows, cols = tiles(image, self.image["preprocess"])
        tokens = len(frames) * self.image["tokens_per_tile"]
        return EncodedImage({"pixel_values": frames}, tokens, {"rows": rows, "cols": cols})

    def embeds(self, session, encoded: EncodedImage) -> np.ndarray:
        """vision.onnx one frame at a time -> [tokens, hidden]. Frames are independent (the tower sees
        each tile alone), and one call over all of them holds every frame's activations at once: at
        SmolVLM-256M's own settings (17 frames of 512 px) that was 7 GB more memory than the model."""
        pixels = encoded.feeds["pixel_values"]
        rows = [session.run(None, {**encoded.feeds, "pixel_values": pixels[i : i + 1]})[0] for i in range(len(pixels))]
        image_embeds = np.concatenate(rows)
        return image_embeds.reshape(-1, image_embeds.shape[-1])

    def image_text(self, encoded: EncodedImage) -> str:
        """Idefics3Processor's expansion of one "<image>": each tile behind its <row_r_col_c> marker,
        a newline after each row, then the global image behind <global-img>."""
        tile, image = self.image["tile_token"], self.image["token"] * self.image["tokens_per_tile"]
        rows, cols = encoded.info["rows"], encoded.info["cols"]
        text = "".join(
            "".join(f"{tile}<row_{r + 1}_col_{c + 1}>{image}" for c in range(cols)) + "\n" for r in range(rows)
        )
        if rows or cols:
            text += "\n"
        return text + f"{tile}{self.image['global_token']}{image}{tile}"


def tiles(image: Image.Image, params: dict) -> tuple[np.ndarray, int, int]:
    """One image -> (float32 frames [tiles, 3, T, T], tile rows, tile cols); rows = cols = 0 when
    the image is a single frame. Frames are the tiles row by row, the global image last."""
    image, tile = image.convert("RGB"), params["tile_size"]
    resample = preprocess.RESAMPLE[params["resample"]]
    if params["longest_edge"]:
        image = image.resize(longest_edge_size(image.size, params["longest_edge"]), resample)
    rows = cols = 0
    if not params["split"]:
        frames = [image.resize((tile, tile), resample)]
    else:
        image = image.resize(tile_grid_size(image.size, tile), resample)
        frames = []
        if image.width > tile or image.height > tile:
            rows, cols = image.height // tile, image.width // tile
            boxes = [(c * tile, r * tile, (c + 1) * tile, (r + 1) * tile) for r in range(rows) for c in range(cols)]
            frames = [image.crop(box) for box in boxes]
            image = image.resize((tile, tile), resample)
        frames.append(image)
    normalise = {**params, "convert_rgb": False, "resize_shortest_edge": None, "crop_size": None}
    return np.stack([preprocess.pixel_values(frame, normalise) for frame in frames]), rows, cols


def longest_edge_size(size: tuple[int, int], longest: int) -> tuple[int, int]:
    """PIL (width, height) with the longest side at ``longest``; the other side truncated, then
    rounded up to even, then both capped at MAX_IMAGE_SIZE (without the even rounding)."""
    width, height = size
    aspect = width / height
    if width >= height:
        width, height = longest, int(longest / aspect)
        height += height % 2
    else:
        height, width = longest, int(longest * aspect)
        width += width % 2
    width, height = max(width, 1), max(height, 1)
    aspect = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width, height = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / aspect)
    elif height > width and height > MAX_IMAGE_SIZE:
        height, width = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * aspect)
    return max(width, 1), max(height, 1)


def tile_grid_size(size: tuple[int, int], tile: int) -> tuple[int, int]:
    """PIL (width, height) rounded up to whole tiles: the long side first, the short one from the
    aspect ratio (truncated, as the processor does) and rounded up too."""
    width, height = size
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return width, height
