"""Held-out accuracy: answer each sample's first question and compare with its first answer.

Works on a run directory (the 4-bit backbone with its trained method, as trained), a merged
model directory (fp32), or an ONNX bundle. The bundle path imports neither torch nor
transformers, so it runs on the device itself.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgetune.data import Sample, normalize_answer
from edgetune.errors import UserError


@dataclass
class EvalReport:
    accuracy: float
    correct: int
    total: int
    seconds: float
    source: str
    examples: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def score(samples: list[Sample], predictions: list[str], source: str, seconds: float) -> EvalReport:
    results = [normalize_answer(p) == normalize_answer(s.answer) for s, p in zip(samples, predictions)]
    examples = [
        {"id": s.id, "question": s.question, "answer": s.answer, "prediction": p, "correct": ok}
        for s, p, ok in zip(samples, predictions, results)
    ]
    return EvalReport(sum(results) / len(results), sum(results), len(results), seconds, source, examples[:20])


def kind_of_dir(path: Path) -> str:
    path = Path(path)
    if (path / "manifest.json").is_file():
        return "bundle"
    if (path / "adapter").is_dir() and (path / "recipe.yaml").is_file():
        return "run"
    if (path / "config.json").is_file():
        return "model"
    raise UserError(f"{path} is not a run directory, a merged model or a bundle (no adapter/, config.json or manifest.json)")


def answer_with_bundle(bundle_dir: Path, samples: list[Sample], max_new_tokens: int) -> list[str]:
    from edgetune.runtime import OnnxVLM

    vlm = OnnxVLM.load(bundle_dir)
    return [vlm.generate(s.images[0], s.question, max_new_tokens=max_new_tokens) for s in samples]


def answer_with_torch(model: Any, processor: Any, family: Any, samples: list[Sample], max_new_tokens: int) -> list[str]:
    """Greedy answers from a transformers model (already on its device, in eval mode)."""
    import torch

    from edgetune.data import open_image

    device = next(model.parameters()).device
    tokenizer = processor.tokenizer
    answers = []
    with torch.no_grad():
        for sample in samples:
            inputs = family.prompt_inputs(processor, [sample.question], [[open_image(p) for p in sample.images]])
            inputs = {k: v.to(device) for k, v in inputs.items()}
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            answers.append(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return answers


def evaluate_path(path: Path, samples: list[Sample], max_new_tokens: int = 16) -> EvalReport:
    kind = kind_of_dir(path)
    start = time.perf_counter()
    if kind == "bundle":
        predictions = answer_with_bundle(path, samples, max_new_tokens)
    else:
        predictions = _answer_with_torch_dir(path, kind, samples, max_new_tokens)
    return score(samples, predictions, f"{kind}:{path}", time.perf_counter() - start)


def _answer_with_torch_dir(path: Path, kind: str, samples: list[Sample], max_new_tokens: int) -> list[str]:
    from edgetune.merge import load_merged

    if kind == "run":
        from edgetune.merge import load_adapted

        backbone, model, _ = load_adapted(path, dequantize=False)
        return answer_with_torch(model, backbone.processor, backbone.family, samples, max_new_tokens)
    merged = load_merged(path)
    return answer_with_torch(merged.model, merged.processor, merged.family, samples, max_new_tokens)
