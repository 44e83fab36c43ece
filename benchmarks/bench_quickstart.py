"""Quickstart benchmark: each stage's time, then decode tokens/s of the ONNX runtime vs PyTorch
eager ``generate`` on the same merged model, same image and prompt, side by side in one run.

    python benchmarks/bench_quickstart.py [--family llava] [--out DIR] [--tokens 64] [--repeats 5]

Decode speed is the steady state after the prefill: for PyTorch, the time of generate(N+1
tokens) minus generate(1 token), both forced past eos; for ONNX, N timed single-token steps with
the KV cache. The median over --repeats is reported. Results go to stdout and DIR/bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path


def torch_decode_tokens_per_second(model_dir: Path, image: Path, prompt: str, tokens: int) -> float:
    import torch
    from PIL import Image

    from edgetune.merge import load_merged

    merged = load_merged(model_dir)
    model, processor = merged.model, merged.processor
    inputs = merged.family.prompt_inputs(processor, [prompt], [[Image.open(image).convert("RGB")]])

    def timed(n: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=processor.tokenizer.pad_token_id)
        return time.perf_counter() - start

    timed(2)  # warm-up
    return tokens / (timed(tokens + 1) - timed(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="llava")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from edgetune.progress import quiet_libraries

    quiet_libraries()
    import torch

    from edgetune.quickstart import run_quickstart
    from edgetune.runtime import OnnxVLM
    from edgetune.runtime.speed import decode_tokens_per_second

    out = args.out or Path(tempfile.mkdtemp(prefix="edgetune-bench-")) / "quickstart"
    summary = run_quickstart(out, family=args.family)
    image = next((out / "data/images").glob("eval-*.png"))
    prompt = "What color is the shape?"
    vlm = OnnxVLM.load(out / "bundle")
    decode_tokens_per_second(vlm, image, prompt, 8)  # warm-up
    onnx = [decode_tokens_per_second(vlm, image, prompt, args.tokens) for _ in range(args.repeats)]
    eager = [torch_decode_tokens_per_second(out / "merged", image, prompt, args.tokens) for _ in range(args.repeats)]
    result = {
        "family": args.family,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "stage_seconds": summary["stage_seconds"],
        "total_seconds": summary["total_seconds"],
        "decode_tokens": args.tokens,
        "onnx_decode_tokens_per_s": statistics.median(onnx),
        "torch_eager_decode_tokens_per_s": statistics.median(eager),
        "onnx_over_torch": statistics.median(onnx) / statistics.median(eager),
        "accuracy": {k: summary[k] for k in ("accuracy_before", "accuracy_after_pytorch", "accuracy_after_onnx")},
        "bundle_mb": summary["bundle_mb"],
    }
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    print("\nstage                                  seconds")
    for name, seconds in result["stage_seconds"].items():
        print(f"{name:<38} {seconds:7.1f}")
    print(f"{'total':<38} {result['total_seconds']:7.1f}")
    print(f"\ndecode tokens/s ({args.tokens} tokens, median of {args.repeats})")
    print(f"  onnxruntime bundle   {result['onnx_decode_tokens_per_s']:8.0f}")
    print(f"  pytorch eager        {result['torch_eager_decode_tokens_per_s']:8.0f}")
    print(f"  ratio onnx / eager   {result['onnx_over_torch']:8.2f}x")
    print(f"\n{out / 'bench.json'}")


if __name__ == "__main__":
    main()
