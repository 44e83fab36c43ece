"""LLaVA-NeXT's any-resolution images, torch-free: the crops LlavaNextImageProcessor makes and the
packing LlavaNextModel.pack_image_features does, in numpy and PIL.

encode (the slow image processor's steps, in its order):
1. pick the best of the manifest's grid pinpoints (select_best_resolution: the most of the image's
   pixels kept, then the least padding);
2. resize the uint8 image to fit it, keeping the aspect ratio (sides rounded up), and zero-pad it
   to exactly that resolution, centred (the odd pixel goes to the bottom/right);
3. cut it into crop-size tiles, row by row, after a squashed copy of the whole image (the base);
4. each crop through CLIP's steps (edgetune.runtime.preprocess.pixel_values).
vision.onnx turns the crops into per-crop embeddings [crops, side*side, hidden] and also outputs the
model's image_newline [hidden]. embeds then packs them: the base's tokens, then the tiles joined
into one grid, the rows or columns that only saw padding cut off (unpad_image, same rounding), and
image_newline after every row. The image's token count therefore depends on its size; encode
computes it without running the model, as the HF processor does to expand "<image>".
Written by hand because the runtime must not import transformers; the export parity check
compares the packed embeddings and the prompt tokens with PyTorch's.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from edgetune.runtime import preprocess
from edgetune.runtime.codecs.base import Codec, EncodedImage


class LlavaNextCodec(Codec):
    def encode(self, image: Image.Image) -> EncodedImage:
        spec = self.image
        image = image.convert("RGB")
        width, height = image.size
        best = select_best_resolution((height, width), spec["grid_pinpoints"])
        resample = preprocess.RESAMPLE[spec["preprocess"]["resample"]]
        fit_height, fit_width = fit_inside((height, width), best)
        canvas = np.zeros((*best, 3), dtype=np.uint8)
        top, left = (best[0] - fit_height) // 2, (best[1] - fit_width) // 2
        canvas[top : top + fit_height, left : left + fit_width] = np.asarray(image.resize((fit_width, fit_height), resample))
        tile = spec["crop_size"]
        tiles = [canvas[i : i + tile, j : j + tile] for i in range(0, best[0], tile) for j in range(0, best[1], tile)]
        base = image.resize((spec["base_size"], spec["base_size"]), resample)
        crops = [base, *(Image.fromarray(t) for t in tiles)]
        pixels = np.stack([preprocess.pixel_values(crop, spec["preprocess"]) for crop in crops])
        rows, cols = unpadded_grid((height, width), best, tile, spec["crop_side"])
        tokens = spec["crop_side"] ** 2 + rows * (cols + 1)
        return EncodedImage({"pixel_values": pixels}, tokens, {"size": (height, width), "best": best})

    def embeds(self, session, encoded: EncodedImage) -> np.ndarray:
        """vision.onnx on one image's crops, packed into [tokens, hidden] as the model packs them."""
        crops, newline = session.run(None, encoded.feeds)
        side, hidden = self.image["crop_side"], crops.shape[-1]
        best, tile = encoded.info["best"], self.image["crop_size"]
        grid_height, grid_width = best[0] // tile, best[1] // tile
        grid = crops[1:].reshape(grid_height, grid_width, side, side, hidden).transpose(0, 2, 1, 3, 4)
        grid = grid.reshape(grid_height * side, grid_width * side, hidden)
        rows, cols = unpadded_grid(encoded.info["size"], best, tile, side)
        top, left = (grid.shape[0] - rows) // 2, (grid.shape[1] - cols) // 2
        grid = grid[top : top + rows, left : left + cols]
        newlines = np.broadcast_to(newline.astype(grid.dtype), (rows, 1, hidden))
        packed = np.concatenate([grid, newlines], axis=1).reshape(-1, hidden)
        return np.concatenate([crops[0], packed])


def select_best_resolution(size: tuple[int, int], pinpoints: list[list[int]]) -> tuple[int, int]:
    """transformers' select_best_resolution: (height, width) of the pinpoint that keeps the most of
    the image's pixels once fitted inside, ties broken by the least wasted area (first one wins)."""
    height, width = size
    best, most_kept, least_wasted = None, 0, float("inf")
    for pin_height, pin_width in pinpoints:
        scale = min(pin_width / width, pin_height / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        wasted = pin_width * pin_height - kept
        if kept > most_kept or (kept == most_kept and wasted < least_wasted):
            best, most_kept, least_wasted = (pin_height, pin_width), kept, wasted
    return best


def fit_inside(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the image resized into ``target`` keeping its aspect (get_patch_output_size)."""
    height, width = size
    target_height, target_width = target
    if target_width / width < target_height / height:
        return min(math.ceil(height * target_width / width), target_height), target_width
    return target_height, min(math.ceil(width * target_height / height), target_width)


def unpadded_grid(size: tuple[int, int], best: tuple[int, int], tile: int, side: int) -> tuple[int, int]:
    """Rows and columns of the tiles' feature grid left after unpad_image cuts what only saw padding
    (an even number of rows or columns, split between both ends)."""
    height, width = size
    rows, cols = best[0] // tile * side, best[1] // tile * side
    if width / height > cols / rows:
        rows -= (rows - int(round(height * (cols / width), 7))) // 2 * 2
    else:
        cols -= (cols - int(round(width * (rows / height), 7))) // 2 * 2
    return rows, cols
