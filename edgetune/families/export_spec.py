"""What a family hands the exporter: the vision graph it traces and the manifest's prompt section.

The families' export hooks (``vision_graph``, ``bundle_sections``) build these; edgetune.export
consumes them. They live with the families so that the dependencies run one way, export/ ->
families/, as the data does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.export import Dim

from edgetune.errors import UserError

PROMPT_SENTINEL = "EDGETUNE_PROMPT_SENTINEL"


@dataclass
class GraphSpec:
    """Everything torch.onnx.export needs for one graph."""

    name: str  # "vision", "embed" or "decoder"; the file is f"{name}.onnx"
    module: torch.nn.Module
    sample_args: tuple
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: tuple


class VisionGraph(torch.nn.Module):
    """pixel_values -> image embeddings in the LLM's hidden size (vision tower + connector)."""

    def __init__(self, family: Any, model: Any):
        super().__init__()
        self.family, self.model = family, model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.family.image_features(self.model, pixel_values)


def fixed_size_vision_graph(family: Any, model: Any, size: dict[str, int]) -> GraphSpec:
    """vision.onnx for families whose processor makes every image one [3, height, width] array."""
    return GraphSpec(
        name="vision",
        module=VisionGraph(family, model),
        sample_args=(torch.randn(2, 3, size["height"], size["width"]),),
        input_names=["pixel_values"],
        output_names=["image_embeds"],
        dynamic_shapes=({0: Dim("batch")},),
    )


def render_prompt(processor: Any, prompt: str) -> str:
    """The chat-formatted single-turn text for one image and ``prompt``, as the HF processor renders it."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


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
