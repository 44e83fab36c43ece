"""The quickstart's built-in multimodal task, drawn offline with PIL.

Each image is one coloured shape (circle, square or triangle) at a random place and size on a
light, noisy background. Questions ask for the colour or the shape, answered with one word. The
train and held-out splits are drawn from different seeds, so held-out accuracy measures
generalisation to unseen images, not recall. A frozen random-weight model scores near zero;
chance with the answer vocabulary known is 1/3 for shapes and 1/5 for colours.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 210, 20), "purple": (140, 40, 170)}
SHAPES = ("circle", "square", "triangle")
QUESTIONS = {"color": "What color is the shape?", "shape": "What shape is this?"}
IMAGE_SIZE = 48


def draw_shape(rng: random.Random, color: str, shape: str) -> Image.Image:
    background = tuple(rng.randint(200, 255) for _ in range(3))
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    draw = ImageDraw.Draw(image)
    size = rng.randint(IMAGE_SIZE // 2, IMAGE_SIZE * 7 // 8)
    x0, y0 = rng.randint(0, IMAGE_SIZE - size), rng.randint(0, IMAGE_SIZE - size)
    box = (x0, y0, x0 + size, y0 + size)
    fill = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLORS[color])
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x0 + size / 2, y0), (x0, y0 + size), (x0 + size, y0 + size)], fill=fill)
    return image


def write_split(out_dir: Path, name: str, count: int, seed: int) -> Path:
    """Write ``count`` LLaVA-format entries to out_dir/name.json with images in out_dir/images/."""
    rng = random.Random(seed)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(count):
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        image_name = f"images/{name}-{i:04d}.png"
        draw_shape(rng, color, shape).save(out_dir / image_name)
        asked = rng.choice(list(QUESTIONS))
        entries.append({
            "id": f"{name}-{i:04d}",
            "image": image_name,
            "conversations": [
                {"from": "human", "value": f"<image>\n{QUESTIONS[asked]}"},
                {"from": "gpt", "value": color if asked == "color" else shape},
            ],
        })
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(entries, indent=1))
    return path


def write_task(out_dir: Path, train_count: int = 1000, eval_count: int = 60) -> tuple[Path, Path]:
    return write_split(out_dir, "train", train_count, seed=1), write_split(out_dir, "eval", eval_count, seed=2)
