"""Image -> pixel_values with PIL and numpy, reproducing transformers' slow CLIPImageProcessor.

The steps and their order are CLIPImageProcessor.preprocess's: convert to RGB, resize so the
shortest edge is ``resize_shortest_edge`` (the long edge is truncated, ``int(size * long / short)``)
with PIL on uint8 pixels, center crop (top/left offsets rounded down), rescale in float64 then cast
to float32, normalize per channel, channels first. The manifest's ``image.preprocess`` section
carries the parameters. Written by hand because the runtime must not import transformers; the
export parity test checks it against the HF processor to 1e-5.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from edgetune.errors import UserError

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def open_image(image: Path | str | Image.Image) -> Image.Image:
    """A path or a PIL image -> the 8-bit RGB PIL image that every edgetune stage reads.

    Training, PyTorch evaluation, the export's parity check and the device runtime all read images
    through this function, and hand the HF processors its RGB output, so that no stage sees an image
    differently. The rule, in order:

    1. EXIF orientation is applied (``ImageOps.exif_transpose``): a photo stored sideways with
       orientation 6 comes out upright, its width and height swapped. Multi-frame files give their
       first frame.
    2. 16-bit and 32-bit grey (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``, ``I``) is scaled to 8 bit
       by dropping the low byte, ``value >> 8`` (``I`` clipped to 0..65535 first: 16-bit PNGs
       open as ``I`` in older Pillow), then made grey RGB. PIL's own ``convert("RGB")`` would
       clip every value above 255 to white. Float grey (``F``) is taken as 0..255, truncated and
       clipped (PIL's ``convert("L")``).
    3. Transparency is composited onto white (255, 255, 255): modes with alpha (``RGBA``, ``LA``,
       ``PA``, ``RGBa``, ``La``) and palette or RGB/L images with a ``transparency`` key. A fully
       transparent pixel becomes white, as it looks on a white page; dropping alpha instead would
       show whatever colour the transparent pixels happen to store.
    4. Every other mode goes through PIL's ``convert("RGB")``: ``P`` through its palette, ``1`` as
       0/255, ``L`` as grey, ``CMYK`` and ``YCbCr`` with PIL's conversion.

    An unreadable path is a UserError naming it; a PIL image is never modified in place.
    """
    if isinstance(image, Image.Image):
        return _to_rgb(ImageOps.exif_transpose(image))
    try:
        with Image.open(image) as opened:
            opened.load()
            return _to_rgb(ImageOps.exif_transpose(opened))
    except (OSError, UnidentifiedImageError) as err:
        raise UserError(f"{image}: cannot read this image ({err}); pass a PNG/JPEG file") from None


BACKGROUND = (255, 255, 255)  # what transparent pixels are composited onto (open_image, rule 3)
ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def _to_rgb(image: Image.Image) -> Image.Image:
    """open_image's rules 2-4 (see there) on an already upright image."""
    if image.mode.startswith("I"):  # I;16, I;16L, I;16B, I;16N, I
        grey = np.clip(np.asarray(image).astype(np.int64), 0, 65535) >> 8
        return Image.fromarray(grey.astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        return image.convert("L").convert("RGB")
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")  # premultiplied RGBa/La are unpremultiplied here
        return Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND + (255,)), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def pixel_values(image: Image.Image, params: dict) -> np.ndarray:
    """One image -> float32 [3, crop_height, crop_width], as CLIPImageProcessor would produce."""
    if params["convert_rgb"] or image.mode != "RGB":  # the vision graph takes 3 channels either way
        image = image.convert("RGB")
    if params["resize_shortest_edge"]:
        size = _shortest_edge_size(image.size, params["resize_shortest_edge"])
        image = image.resize(size, RESAMPLE[params["resample"]])
    pixels = np.asarray(image)
    if params["crop_size"]:
        pixels = _center_crop(pixels, *params["crop_size"])
    if params["rescale_factor"] is not None:
        pixels = (pixels.astype(np.float64) * params["rescale_factor"]).astype(np.float32)
    pixels = pixels.astype(np.float32)
    if params["mean"] is not None:
        mean = np.asarray(params["mean"], dtype=np.float32)
        std = np.asarray(params["std"], dtype=np.float32)
        pixels = (pixels - mean) / std
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def _shortest_edge_size(size: tuple[int, int], shortest_edge: int) -> tuple[int, int]:
    """PIL (width, height) after resizing the short edge to ``shortest_edge``, keeping the aspect."""
    width, height = size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_edge * long / short)
    return (shortest_edge, new_long) if width <= height else (new_long, shortest_edge)


def _center_crop(pixels: np.ndarray, crop_height: int, crop_width: int) -> np.ndarray:
    height, width = pixels.shape[:2]
    if crop_height > height or crop_width > width:
        # CLIPImageProcessor zero-pads here; every CLIP-style config crops at most the resized size.
        raise UserError(f"image of {width}x{height} is smaller than the crop {crop_width}x{crop_height}")
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    return pixels[top : top + crop_height, left : left + crop_width]
