"""Steady-state decode speed of a bundle: single-token steps with the KV cache, eos ignored."""

from __future__ import annotations

import time

import numpy as np


def decode_tokens_per_second(vlm, image, prompt: str, tokens: int = 64) -> float:
    """Tokens/s over ``tokens`` greedy decode steps after the prefill (which is not timed)."""
    encoded = vlm.encode_image(image)
    input_ids = np.array([vlm.prompt_ids(prompt, encoded)], dtype=np.int64)
    mask = np.ones_like(input_ids)
    past = vlm.kv_buffer(1, input_ids.shape[1] + tokens)
    logits, past = vlm.forward(input_ids, mask, past, images=[encoded], logits_to_keep=1)
    start = time.perf_counter()
    for _ in range(tokens):
        token = int(np.argmax(logits[0, -1]))
        mask = np.concatenate([mask, np.ones((1, 1), dtype=np.int64)], axis=1)
        logits, past = vlm.forward(np.array([[token]], dtype=np.int64), mask, past)
    return tokens / (time.perf_counter() - start)
