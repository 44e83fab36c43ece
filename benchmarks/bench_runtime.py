"""Runtime speed at real model shapes: edgetune's OnnxVLM beside llama.cpp, onnxruntime-genai and
PyTorch on the same random weights, the same prompt length and the same thread count, against the
machine's memory-bandwidth roofline.

For each model (``--models``; names ``smolvlm-256m``, ``smolvlm-500m``, ``qwen2-vl-2b``, the
benchmarks/configs/ shapes) it prepares, under ``--work`` (reused when already there):

- the random-weight VLM directory (benchmarks/real_shapes.py, or ``--model-dir NAME=DIR``);
- edgetune bundles at each ``--precisions`` (``edgetune export ... --eval-samples 0``, run by the
  installed edgetune, or by the one in ``--export-src DIR``; a bundle already under --work is reused,
  so use another --work to compare bundles of two exporters);
- the text model pulled out of the VLM as a plain causal LM directory with the same tensors
  (SmolVLM: LlamaForCausalLM, ``model.text_model.*`` -> ``model.*`` plus ``lm_head``; Qwen2-VL:
  Qwen2ForCausalLM, ``model.*`` minus ``visual.*``, head tied to the embedding). M-RoPE on text
  positions is plain RoPE, and the peers are fed token ids only, so their work per token is the
  same as the VLM's text model; the image tokens are fed to them as random token ids;
- GGUF F32/F16 of that text model (llama.cpp's convert_hf_to_gguf.py from llama-cpp-python's
  sdist, ``--llama-src``), quantized to Q4_0 and Q4_K_M with ``llama_cpp.llama_model_quantize``;
- the mmproj GGUF of the VLM's vision tower and connector (the same converter with ``--mmproj``, F16
  as llama.cpp's published mmproj files are; patch embedding and position table stay F32, as the
  converter wants). It reads only the vision/connector tensors of the VLM directory, so it pairs
  with every text GGUF above (the same checkpoint). Only for the families in MTMD_FAMILIES;
- onnxruntime-genai models (its model builder, int4 and fp32, CPU), with intra_op_num_threads set.

Then it measures, one engine at a time, each in a fresh subprocess:

- edgetune (``--edgetune-src DIR`` runs the runtime from that source tree, ``--baseline-src DIR``
  also runs a second tree, so before/after sit side by side): one 512x512 image and a 16-token
  question. TTFT is split into preprocessing (encode_image + prompt_ids), the vision graph
  (image_embeds) and the prefill: ``forward`` is called with the image embeddings already computed
  (the instance's image_embeds is replaced by one that returns them), so the prefill is the embed
  graph, the merge and the decoder over the prompt, without the vision graph. If a runtime's
  forward does not go through image_embeds, the prefill is forward's time minus the vision time
  (the table says so). TTFT is the median of ``--repeats`` runs after one warm-up run (the cold
  first run is in the JSON). Decode: the argmax token is fed back for 2 warm-up steps and then
  ``--decode-tokens`` timed steps (eos is ignored; random weights emit it at random). Peak RSS is
  the worker's VmHWM (the whole process: Python, onnxruntime, the sessions).
- llama.cpp (llama-cpp-python, ``Llama(n_threads=N, n_threads_batch=N)``, its default n_batch):
  TTFT through llama.cpp's multimodal library (mtmd, driven through llama-cpp-python's ctypes
  bindings as its Llava15ChatHandler drives it) for the GGUF types in ``--llamacpp-ttft`` (default
  Q4_0): the same 512x512 image (raw RGB, so no file decoding on either side) and the same question
  in the same chat prompt (the manifest's single turn, mtmd's media marker for the image). mtmd's
  context: the mmproj GGUF, N threads, CPU, its defaults otherwise (flash attention auto, a warm-up
  encode at load). Preprocessing = mtmd_bitmap_init + mtmd_tokenize (resize, tiles, normalization,
  the prompt's tokens); vision = mtmd_encode_chunk summed over the image chunks (llama.cpp encodes
  one tile per call); prefill = the rest up to the first token: each text chunk through
  ``Llama.eval`` and each image chunk's embeddings through mtmd_helper_decode_image_chunk, in prompt
  order (llama.cpp interleaves them: encode tile 1, decode its tokens, encode tile 2, ...; the split
  sums those intervals), then the argmax of the last logits. Median of ``--repeats`` after one
  warm-up run, as edgetune's. The row's prefill columns are then this prefill (the text-only one
  below is in the JSON and in the note), and its peak RSS includes the vision tower. Then, on the
  same context: prefill tokens/s over the same number of prompt tokens as edgetune's prompt (random
  ids standing for the image tokens), then 2 + ``--decode-tokens`` single-token evals, argmax fed
  back. mtmd looks up a few separator texts as single tokens; the random checkpoints' small
  tokenizers lack Idefics3's "\\n\\n", which is then spelled as the tokenizer spells it (two "\\n"), as
  in edgetune's prompt: both prompts are then the same token ids (1155 for SmolVLM-256M at 512 px:
  17 frames of 64 tokens plus 67 text tokens). The table's note gives llama.cpp's frames and image
  tokens beside edgetune's.
- onnxruntime-genai: the same prompt length through ``append_tokens`` (prefill), then
  ``generate_next_token`` steps; min_length = max_length so that eos does not end the run.
- PyTorch eager (fp32, the merged VLM, ``torch.set_num_threads(N)``): ``generate`` with
  min_new_tokens = max_new_tokens and a streamer that timestamps each token; decode tokens/s over
  the same window (the prompt is token ids only).
- the roofline: read bandwidth measured with numpy in N threads (each sums / dots its own 1 GB
  array, which releases the GIL; the best kernel and repetition), before and after the engines;
  the larger is used. Bytes read per decoded token = the engine's text weights at its precision
  (edgetune: decoder graph + data files; GGUF: tensor bytes without the token table, unless the
  head is tied to it; genai: initializers not used only by Gather; torch: fp32 text weights
  without the embedding unless tied) + the KV cache at the middle of the timed window (its dtype:
  edgetune/genai/torch fp32, llama.cpp f16). roofline tok/s = bandwidth / bytes per token.

Prints a table per model, then the machine's facts, then, last, one line per model:
``RESULT model=<name> int4_tok_s=<x> llamacpp_q4_0_tok_s=<y> ortgenai_int4_tok_s=<z>
roofline_tok_s=<r> ttft_s=<t> llamacpp_ttft_s=<u>`` (edgetune int4 decode, llama.cpp Q4_0 decode,
genai int4 decode, the int4 bundle's roofline, edgetune int4 TTFT, llama.cpp Q4_0 multimodal TTFT;
``nan`` for an engine that did not run).

Environments. The runtime under test stays torch-free: its worker imports only the runtime. The
``bench`` extra (``pip install -e .[bench]``, with CMAKE_ARGS=-DGGML_NATIVE=ON so that llama.cpp is
built for this CPU, about 8 minutes on 2 cores) adds llama-cpp-python and what convert_hf_to_gguf.py
needs (sentencepiece, gguf's own deps; torch and transformers come from the train extra).
onnxruntime-genai runs in its own virtualenv (``--genai-python``): its model builder imports classes
that transformers 4.57 (the version edgetune pins) lacks and needs onnx_ir, so it needs a newer
transformers than edgetune's; make one with ``python3 -m venv V && V/bin/pip install torch==2.13.0
onnxruntime-genai transformers onnx_ir onnx``. Without it the genai rows say "skipped".

    python benchmarks/bench_runtime.py --models smolvlm-256m --threads 2 --work /tmp/bench_rt \\
        --model-dir smolvlm-256m=/tmp/rs/smolvlm-256m --llama-src /tmp/bench_rt/sdist/llama_cpp_python-0.3.36 \\
        --genai-python /tmp/bench_rt/genai-venv/bin/python [--edgetune-src DIR] [--baseline-src DIR]

Written by hand because no library runs these four engines side by side; each engine is driven
through its own public API.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Top-level imports stay stdlib-only: this file is also the worker that runs inside the torch-free
# runtime environment and inside onnxruntime-genai's virtualenv.

HERE = Path(__file__).resolve().parent
MODELS = ("smolvlm-256m", "smolvlm-500m", "qwen2-vl-2b")
PRECISIONS = ("fp32", "int8", "int4")
ENGINES = ("edgetune", "llamacpp", "genai", "torch")
GGUF_TYPES = {"F32": None, "F16": None, "Q4_0": 2, "Q4_K_M": 15}  # llama_ftype of the quantized ones
GENAI_PRECISIONS = ("int4", "fp32")
PRE_TOKENIZER = {"idefics3": "smollm", "qwen2_vl": "qwen2"}  # what convert_hf_to_gguf.py is told
# Families whose TTFT goes through llama.cpp's multimodal path, with the separator text that mtmd looks
# up as one token and the random checkpoints' small tokenizers lack (spelled out instead). Not
# qwen2_vl: mtmd decodes its image with M-RoPE positions, which the plain Qwen2 text GGUF lacks.
MTMD_FAMILIES = {"idefics3": "\n\n"}
LLAMA_TOKEN_NULL = -1  # what mtmd puts in a text chunk for a separator the vocabulary lacks
WARMUP_STEPS = 2
WORKER_TAG = "WORKER_JSON "
GB = 1e9
MB = 1e6


# ================================================================================================
# workers: each runs in its own process and prints one WORKER_TAG line
# ================================================================================================


def vm_hwm() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def question_text(tokenizer, tokens: int) -> tuple[str, int]:
    """A question of ``tokens`` tokens (as near as the tokenizer allows) and its token count."""
    words = ["what", "is", "shown", "in", "this", "picture", "and", "which", "colors", "do", "you", "see", "there",
             "please", "describe", "every", "object", "you", "can", "find", "in", "it", "carefully"]
    text = ""
    for word in words * 4:
        text = f"{text} {word}".strip()
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        if len(ids) >= tokens:
            text = tokenizer.decode(ids[:tokens])
            break
    return text, len(tokenizer.encode(text, add_special_tokens=False).ids)


def worker_edgetune(spec: dict) -> dict:
    """TTFT split, prefill and decode of one bundle with the edgetune runtime found on sys.path."""
    import numpy as np
    from PIL import Image

    import edgetune
    from edgetune.runtime import OnnxVLM

    started = time.perf_counter()
    vlm = OnnxVLM.load(spec["bundle"], threads=spec["threads"])
    load_s = time.perf_counter() - started
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (spec["image_size"], spec["image_size"], 3), dtype=np.uint8))
    question, question_tokens = question_text(vlm.tokenizer, spec["question_tokens"])

    cached: dict = {}
    real_image_embeds = vlm.image_embeds

    def precomputed_image_embeds(images):
        cached["calls"] = cached.get("calls", 0) + 1
        return cached["embeds"]

    def first_token() -> dict:
        t0 = time.perf_counter()
        encoded = vlm.encode_image(image)
        ids = np.array([vlm.prompt_ids(question, encoded)], dtype=np.int64)
        t1 = time.perf_counter()
        cached["embeds"] = real_image_embeds([encoded])
        t2 = time.perf_counter()
        vlm.image_embeds = precomputed_image_embeds
        cached["calls"] = 0
        # The prefill as generation runs it: the cache preallocated and written in place where the
        # bundle allows it, and the last position's logits only (OnnxVLM.kv_buffer and logits_to_keep;
        # a --edgetune-src from before them has neither).
        capacity = ids.shape[1] + WARMUP_STEPS + spec["decode_tokens"]
        past = vlm.kv_buffer(1, capacity) if hasattr(vlm, "kv_buffer") else None
        last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(vlm.forward).parameters else {}
        try:
            logits, past = vlm.forward(ids, np.ones_like(ids), past, images=[encoded], **last_only)
        finally:
            del vlm.image_embeds  # back to the class's method
        token = int(np.argmax(logits[0, -1]))
        t3 = time.perf_counter()
        skipped_vision = cached["calls"] > 0
        prefill = (t3 - t2) if skipped_vision else (t3 - t2) - (t2 - t1)
        return {"preprocess_s": t1 - t0, "vision_s": t2 - t1, "prefill_s": prefill, "ttft_s": t3 - t0,
                "prefill_excludes_vision": skipped_vision, "prompt_tokens": ids.shape[1],
                "image_tokens": encoded.tokens, "ids": ids, "past": past, "token": token}

    cold = first_token()
    del cold["past"]
    runs = []
    for _ in range(spec["repeats"]):
        if runs:
            runs[-1].pop("past")  # keep one cache alive, as a user's process would
        runs.append(first_token())
    last = runs[-1]
    median = {key: statistics.median(run[key] for run in runs) for key in ("preprocess_s", "vision_s", "prefill_s", "ttft_s")}

    mask = np.ones((1, last["ids"].shape[1]), dtype=np.int64)
    past, token, steps = last["past"], last["token"], []
    for step in range(WARMUP_STEPS + spec["decode_tokens"]):
        t0 = time.perf_counter()
        mask = np.concatenate([mask, np.ones((1, 1), dtype=np.int64)], axis=1)
        logits, past = vlm.forward(np.array([[token]], dtype=np.int64), mask, past)
        token = int(np.argmax(logits[0, -1]))
        if step >= WARMUP_STEPS:
            steps.append(time.perf_counter() - t0)
    return {
        "edgetune_file": edgetune.__file__,
        "load_s": load_s,
        "question_tokens": question_tokens,
        "prompt_tokens": last["prompt_tokens"],
        "image_tokens": last["image_tokens"],
        **median,
        "prefill_excludes_vision": last["prefill_excludes_vision"],
        "prefill_tok_s": last["prompt_tokens"] / median["prefill_s"],
        "cold": {key: cold[key] for key in ("preprocess_s", "vision_s", "prefill_s", "ttft_s")},
        "decode_tok_s": len(steps) / sum(steps),
        "decode_step_ms_p50": 1e3 * statistics.median(steps),
        "peak_rss": vm_hwm(),
    }


def random_prompt(length: int, low: int, high: int, avoid: list[int]) -> list[int]:
    import random

    rng = random.Random(0)
    ids = []
    while len(ids) < length:
        token = rng.randrange(low, high)
        if token not in avoid:
            ids.append(token)
    return ids


def gguf_read_bytes(path: str, llama_src: str) -> dict:
    """Tensor bytes of a GGUF file, and those read per token (all but the token table, unless the
    head reads it: a tied model has no output.weight)."""
    sys.path.insert(0, str(Path(llama_src) / "vendor/llama.cpp/gguf-py"))
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(path).tensors}
    table = tensors.get("token_embd.weight", 0) if "output.weight" in tensors else 0
    return {"tensor_bytes": sum(tensors.values()), "weights_read": sum(tensors.values()) - table}


def mtmd_context(llm, mmproj: str, threads: int):
    """llama.cpp's multimodal context for ``mmproj`` on ``llm``'s text model: CPU, ``threads``
    threads, mtmd's defaults otherwise (flash attention auto, a warm-up encode at load)."""
    from llama_cpp import mtmd_cpp

    params = mtmd_cpp.mtmd_context_params_default()
    params.use_gpu = False
    params.print_timings = False
    params.n_threads = threads
    ctx = mtmd_cpp.mtmd_init_from_file(mmproj.encode(), llm.model, params)
    if not ctx:
        raise RuntimeError(f"mtmd_init_from_file failed for {mmproj}")
    return ctx


def chunk_text_tokens(chunk, spelled_null: list[int]) -> list[int]:
    """A text chunk's token ids, each LLAMA_TOKEN_NULL (a separator the vocabulary lacks) replaced by
    ``spelled_null``, the tokenizer's spelling of that separator."""
    import ctypes

    from llama_cpp import mtmd_cpp

    count = ctypes.c_size_t()
    tokens = mtmd_cpp.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
    ids = []
    for i in range(count.value):
        if tokens[i] == LLAMA_TOKEN_NULL and not spelled_null:
            raise RuntimeError("mtmd's prompt has a separator this vocabulary lacks (see MTMD_FAMILIES)")
        ids += spelled_null if tokens[i] == LLAMA_TOKEN_NULL else [tokens[i]]
    return ids


def eval_image_chunk(llm, ctx, chunk) -> tuple[float, float]:
    """One image chunk (one frame) into ``llm``'s cache at its n_tokens: mtmd_helper_eval_chunk_single's
    image branch, timed. Returns (encode seconds, decode seconds)."""
    import ctypes

    import llama_cpp
    from llama_cpp import mtmd_cpp

    start = time.perf_counter()
    if mtmd_cpp.mtmd_encode_chunk(ctx, chunk):
        raise RuntimeError("mtmd_encode_chunk failed")
    encoded = time.perf_counter()
    n_past = llama_cpp.llama_pos(llm.n_tokens)
    no_callback = mtmd_cpp.mtmd_helper_post_decode_callback()
    if mtmd_cpp.mtmd_helper_decode_image_chunk(ctx, llm._ctx.ctx, chunk, mtmd_cpp.mtmd_get_output_embd(ctx), llm.n_tokens, 0,
                                               llm.n_batch, ctypes.byref(n_past), no_callback, None):
        raise RuntimeError("mtmd_helper_decode_image_chunk failed")
    llm.n_tokens = n_past.value
    return encoded - start, time.perf_counter() - encoded


def llamacpp_first_token(llm, ctx, pixels, prompt: str, spelled_null: list[int]) -> dict:
    """One time to first token through mtmd, from the RGB pixels [H, W, 3] uint8 and a prompt with
    mtmd's media marker, split into preprocess_s / vision_s / prefill_s (seconds; see the module
    docstring), with the image's frames (image chunks) and tokens."""
    import ctypes

    import numpy as np
    from llama_cpp import mtmd_cpp

    llm.reset()  # the next eval drops the cache
    t0 = time.perf_counter()
    rgb = pixels.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
    bitmap = mtmd_cpp.mtmd_bitmap_init(pixels.shape[1], pixels.shape[0], rgb)
    text, raw = mtmd_cpp.mtmd_input_text(), prompt.encode()
    text.text, text.text_len, text.add_special, text.parse_special = raw, len(raw), True, True
    chunks = mtmd_cpp.mtmd_input_chunks_init()
    try:
        if mtmd_cpp.mtmd_tokenize(ctx, chunks, ctypes.byref(text), (mtmd_cpp.mtmd_bitmap_p_ctypes * 1)(bitmap), 1):
            raise RuntimeError("mtmd_tokenize failed")
        t1 = time.perf_counter()
        if mtmd_cpp.mtmd_helper_get_n_tokens(chunks) > llm.n_ctx():
            raise RuntimeError(f"mtmd's prompt exceeds n_ctx {llm.n_ctx()}")
        vision = prefill = 0.0
        frames = image_tokens = 0
        for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks)):
            chunk = mtmd_cpp.mtmd_input_chunks_get(chunks, i)
            if mtmd_cpp.mtmd_input_chunk_get_type(chunk) == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_TEXT:
                start = time.perf_counter()
                llm.eval(chunk_text_tokens(chunk, spelled_null))
                prefill += time.perf_counter() - start
            else:
                encode_s, decode_s = eval_image_chunk(llm, ctx, chunk)
                vision, prefill = vision + encode_s, prefill + decode_s
                frames, image_tokens = frames + 1, image_tokens + mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk)
        start = time.perf_counter()
        int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))  # the first token
        t3 = time.perf_counter()
        prefill += t3 - start
    finally:
        mtmd_cpp.mtmd_input_chunks_free(chunks)
        mtmd_cpp.mtmd_bitmap_free(bitmap)
    return {"preprocess_s": t1 - t0, "vision_s": vision, "prefill_s": prefill, "ttft_s": t3 - t0,
            "frames": frames, "image_tokens": image_tokens, "prompt_tokens": llm.n_tokens}


def llamacpp_ttft(llm, spec: dict) -> dict:
    """TTFT of llama.cpp's multimodal path: the median of ``repeats`` runs after one warm-up run
    (seconds), edgetune's image and question."""
    import numpy as np
    from llama_cpp import mtmd_cpp
    from tokenizers import Tokenizer

    started = time.perf_counter()
    ctx = mtmd_context(llm, spec["mmproj"], spec["threads"])
    load_s = time.perf_counter() - started
    try:
        rng = np.random.default_rng(0)  # edgetune's worker's image, as raw RGB
        pixels = np.ascontiguousarray(rng.integers(0, 256, (spec["image_size"], spec["image_size"], 3), dtype=np.uint8))
        question, _ = question_text(Tokenizer.from_file(spec["tokenizer"]), spec["question_tokens"])
        before, after = spec["single_turn"].split(spec["image_placeholder"], 1)
        marker = mtmd_cpp.mtmd_default_marker().decode()
        prompt = before.replace("{prompt}", question) + marker + after.replace("{prompt}", question)
        spelled_null = llm.tokenize(spec["mtmd_null"].encode(), add_bos=False, special=True) if spec["mtmd_null"] else []
        cold = llamacpp_first_token(llm, ctx, pixels, prompt, spelled_null)
        runs = [llamacpp_first_token(llm, ctx, pixels, prompt, spelled_null) for _ in range(spec["repeats"])]
    finally:
        mtmd_cpp.mtmd_free(ctx)
    splits = ("preprocess_s", "vision_s", "prefill_s", "ttft_s")
    return {**{key: statistics.median(run[key] for run in runs) for key in splits}, "mtmd_load_s": load_s,
            "cold": {key: cold[key] for key in splits}, "frames": runs[-1]["frames"],
            "image_tokens": runs[-1]["image_tokens"], "mtmd_prompt_tokens": runs[-1]["prompt_tokens"]}


def worker_llamacpp(spec: dict) -> dict:
    import numpy as np
    from llama_cpp import Llama

    facts = gguf_read_bytes(spec["gguf"], spec["llama_src"])
    n_ctx = spec["prompt_tokens"] + WARMUP_STEPS + spec["decode_tokens"] + 16
    llm = Llama(model_path=spec["gguf"], n_ctx=n_ctx, n_threads=spec["threads"], n_threads_batch=spec["threads"],
                verbose=False)
    ttft = {}
    if spec.get("mmproj"):
        try:
            ttft = llamacpp_ttft(llm, spec)
        except Exception as err:  # noqa: BLE001 (the text numbers still count; the table shows why TTFT is missing)
            ttft = {"ttft_error": str(err).splitlines()[0]}
    prompt = random_prompt(spec["prompt_tokens"], spec["token_low"], spec["token_high"], spec["avoid"])
    vocab = llm.n_vocab()

    def last_logits():  # the last evaluated token's row (Llama.eval keeps no scores without logits_all)
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))

    llm.reset()
    llm.eval(prompt[:8])  # warm-up (first-call allocations); reset() makes the next eval drop this cache
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    prefill_s = time.perf_counter() - t0
    steps = []
    for step in range(WARMUP_STEPS + spec["decode_tokens"]):
        t0 = time.perf_counter()
        token = int(np.argmax(last_logits()))
        llm.eval([token])
        if step >= WARMUP_STEPS:
            steps.append(time.perf_counter() - t0)
    prefill = {"text_prefill_s": prefill_s, "text_prefill_tok_s": len(prompt) / prefill_s}
    if "ttft_s" in ttft:  # the row's prefill is the multimodal one (the module docstring)
        prefill.update(prefill_s=ttft["prefill_s"], prefill_tok_s=ttft["mtmd_prompt_tokens"] / ttft["prefill_s"])
    else:
        prefill.update(prefill_s=prefill_s, prefill_tok_s=len(prompt) / prefill_s)
    return {**facts, **ttft, **prefill, "prompt_tokens": len(prompt), "decode_tok_s": len(steps) / sum(steps),
            "decode_step_ms_p50": 1e3 * statistics.median(steps), "peak_rss": vm_hwm()}


def onnx_read_bytes(model_path: str) -> dict:
    """Initializer bytes of an ONNX model (external data included) and those read per token: all but
    the tables used only by Gather (the embedding, of which one row is read)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(model_path, load_external_data=False)
    sizes = {}
    for init in model.graph.initializer:
        if uses_external_data(init):
            sizes[init.name] = int(next(e.value for e in init.external_data if e.key == "length"))
        else:
            sizes[init.name] = len(init.raw_data) or onnx.numpy_helper.to_array(init).nbytes
    users: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, set()).add(node.op_type)
    gather_only = [name for name in sizes if users.get(name) == {"Gather"} and sizes[name] > 1e6]
    return {"tensor_bytes": sum(sizes.values()), "weights_read": sum(sizes.values()) - sum(sizes[n] for n in gather_only)}


def worker_genai(spec: dict) -> dict:
    import numpy as np
    import onnxruntime_genai as og

    model_dir = Path(spec["model_dir"])
    config = json.loads((model_dir / "genai_config.json").read_text())
    facts = onnx_read_bytes(str(model_dir / config["model"]["decoder"]["filename"]))
    model = og.Model(str(model_dir))
    prompt = random_prompt(spec["prompt_tokens"], spec["token_low"], spec["token_high"], spec["avoid"])
    total = len(prompt) + WARMUP_STEPS + spec["decode_tokens"] + 4

    def generator():
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        return og.Generator(model, params)

    warm = generator()  # first-call allocations
    warm.append_tokens(np.array(prompt[:8], dtype=np.int32))
    warm.generate_next_token()
    del warm
    gen = generator()
    t0 = time.perf_counter()
    gen.append_tokens(np.array(prompt, dtype=np.int32))
    prefill_s = time.perf_counter() - t0
    steps = []
    for step in range(WARMUP_STEPS + spec["decode_tokens"]):
        t0 = time.perf_counter()
        gen.generate_next_token()
        if step >= WARMUP_STEPS:
            steps.append(time.perf_counter() - t0)
    return {**facts, "genai": og.__version__ if hasattr(og, "__version__") else "", "prompt_tokens": len(prompt),
            "prefill_s": prefill_s, "prefill_tok_s": len(prompt) / prefill_s, "decode_tok_s": len(steps) / sum(steps),
            "decode_step_ms_p50": 1e3 * statistics.median(steps), "peak_rss": vm_hwm()}


def worker_torch(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText

    torch.set_num_threads(spec["threads"])
    model = AutoModelForImageTextToText.from_pretrained(spec["model_dir"], dtype=torch.float32).eval()
    prompt = random_prompt(spec["prompt_tokens"], spec["token_low"], spec["token_high"], spec["avoid"])
    ids = torch.tensor([prompt])

    class Stamps:  # generate() calls put() with the prompt, then once per new token
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    new = 1 + WARMUP_STEPS + spec["decode_tokens"]
    stamps = Stamps()
    with torch.inference_mode():
        model.generate(ids[:, :8], max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, streamer=stamps, pad_token_id=0)
    times = stamps.times  # [start, first token (prefill), token 2, ...]
    window = times[1 + WARMUP_STEPS :]
    steps = [b - a for a, b in itertools.pairwise(window)]
    return {"torch": torch.__version__, "prompt_tokens": len(prompt), "prefill_s": times[1] - times[0],
            "prefill_tok_s": len(prompt) / (times[1] - times[0]),
            "decode_tok_s": len(steps) / sum(steps), "decode_step_ms_p50": 1e3 * statistics.median(steps), "peak_rss": vm_hwm()}


def worker_bandwidth(spec: dict) -> dict:
    """Read bandwidth with ``threads`` threads, each streaming its own array (the GIL is released)."""
    import threading

    import numpy as np

    threads, per_thread = spec["threads"], int(spec["gb_per_thread"] * GB)
    arrays = [np.ones(per_thread // 4, dtype=np.float32) for _ in range(threads)]
    ones = np.ones(per_thread // 4, dtype=np.float32)  # dot's second operand: read too, counted
    kernels = {
        "sum": (lambda a: a.sum(), per_thread),
        "dot": (lambda a: np.dot(a, ones), 2 * per_thread),
    }
    best = {}
    for name, (kernel, bytes_read) in kernels.items():
        for _ in range(spec["repeats"]):
            barrier = threading.Barrier(threads + 1)

            def run(array, barrier=barrier, kernel=kernel):
                barrier.wait()
                kernel(array)

            workers = [threading.Thread(target=run, args=(a,)) for a in arrays]
            for w in workers:
                w.start()
            barrier.wait()
            t0 = time.perf_counter()
            for w in workers:
                w.join()
            rate = threads * bytes_read / (time.perf_counter() - t0)
            best[name] = max(best.get(name, 0.0), rate)
    return {"read_gb_s": max(best.values()) / GB, "by_kernel_gb_s": {k: v / GB for k, v in best.items()},
            "threads": threads, "bytes_per_thread": per_thread}


WORKERS = {"edgetune": worker_edgetune, "llamacpp": worker_llamacpp, "genai": worker_genai, "torch": worker_torch,
           "bandwidth": worker_bandwidth}


# ================================================================================================
# orchestrator: prepares artifacts, runs workers, prints the table
# ================================================================================================


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def run_worker(kind: str, spec: dict, python: str = sys.executable, src: str | None = None, threads: int = 1,
               timeout: float = 3600) -> dict:
    """Run one worker in a fresh process; returns its JSON, or {"error": ...}."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS="1" if kind == "bandwidth" else str(threads),
               MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    if src:
        env["PYTHONPATH"] = src
    command = [python, str(Path(__file__).resolve()), "--worker", kind, "--spec", json.dumps(spec)]
    load = os.getloadavg()[0]  # other work on the machine skews every number: the table shows this
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    for line in done.stdout.splitlines():
        if line.startswith(WORKER_TAG):
            return {**json.loads(line[len(WORKER_TAG):]), "load1_before": load}
    tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-6:])
    return {"error": f"exit {done.returncode}: {tail}", "load1_before": load}


def run_step(command: list[str], logfile: Path, env: dict | None = None, cwd: str | None = None) -> None:
    log(" ".join(command) + f"  (log {logfile})")
    with open(logfile, "w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, check=False)
    if done.returncode:
        tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-8:])
        raise RuntimeError(f"{command[0]} ... exited {done.returncode}; see {logfile}:\n{tail}")


# ---- artifacts -----------------------------------------------------------------------------------


def model_dir_for(name: str, work: Path, given: dict[str, Path]) -> Path:
    if name in given:
        return given[name]
    target = work / name / "model"
    if not (target / "config.json").is_file():
        log(f"building {name} into {target}")
        run_step([sys.executable, str(HERE / "real_shapes.py"), name, "--out", str(target)], work / name / "build.log")
    return target


def export_bundle(model_dir: Path, bundle: Path, precision: str, export_src: Path | None) -> Path:
    """``edgetune export`` (the installed one, or the one in ``export_src``) unless the bundle exists."""
    if (bundle / "manifest.json").is_file():
        return bundle
    bundle.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(export_src)) if export_src else None
    edgetune_cli = shutil.which("edgetune") or str(Path(sys.executable).parent / "edgetune")
    run_step([edgetune_cli, "export", str(model_dir), "--out", str(bundle), "--precision", precision,
              "--eval-samples", "0", "--overwrite"], bundle.parent / f"export-{precision}.log", env=env)
    return bundle


def safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    header.pop("__metadata__", None)
    return header


def text_key(family: str, key: str) -> str | None:
    """The causal LM's name for a VLM checkpoint key, or None for a vision/connector tensor."""
    if family == "idefics3":
        if key.startswith("model.text_model."):
            return "model." + key[len("model.text_model."):]
        return key if key == "lm_head.weight" else None
    if family == "qwen2_vl":  # transformers 4.57 saves Qwen2-VL's text model under model.* and the tower under visual.*
        for prefix in ("model.language_model.", "model."):
            if key.startswith(prefix) and not key.startswith("model.visual."):
                return "model." + key[len(prefix):]
        return key if key == "lm_head.weight" else None
    raise SystemExit(f"no text-model mapping for family {family}")


def text_config(vlm_config: dict) -> dict:
    family = vlm_config["model_type"]
    config = {k: v for k, v in vlm_config["text_config"].items() if k not in ("architectures", "_name_or_path")}
    if family == "idefics3":
        config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    else:
        config.pop("rope_scaling", None)  # M-RoPE is plain RoPE on text positions
        config.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    config["tie_word_embeddings"] = vlm_config.get("tie_word_embeddings", config.get("tie_word_embeddings", False))
    config["torch_dtype"] = "float32"
    return config


def extract_text_model(model_dir: Path, out: Path) -> Path:
    """The VLM's language model as a plain causal-LM directory, tensor for tensor, shard by shard."""
    if (out / "config.json").is_file():
        return out
    from safetensors import safe_open
    from safetensors.numpy import save_file

    vlm_config = json.loads((model_dir / "config.json").read_text())
    family = vlm_config["model_type"]
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    shards = sorted(model_dir.glob("model*.safetensors"))
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        with safe_open(str(shard), framework="np") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                new = text_key(family, key)
                if new:
                    tensors[new] = f.get_tensor(key)
        if tensors:
            save_file(tensors, str(partial / name), metadata={"format": "pt"})
            weight_map.update({key: name for key in tensors})
            total += sum(t.nbytes for t in tensors.values())
        del tensors
    if len(shards) > 1:
        (partial / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (partial / "config.json").write_text(json.dumps(text_config(vlm_config), indent=2))
    for path in model_dir.iterdir():  # tokenizer and generation files
        if path.is_file() and path.name not in ("config.json", "preprocessor_config.json", "processor_config.json") \
                and not path.name.startswith("model") and path.suffix in (".json", ".txt", ".jinja", ".model"):
            shutil.copy2(path, partial / path.name)
    partial.rename(out)
    return out


def text_facts(text_dir: Path) -> dict:
    """Parameters and fp32 bytes of the text model, and the fp32 bytes read per token (all but the
    embedding table unless the head is tied to it)."""
    config = json.loads((text_dir / "config.json").read_text())
    sizes = {}
    for shard in text_dir.glob("model*.safetensors"):
        for key, entry in safetensors_header(shard).items():
            sizes[key] = math.prod(entry["shape"]) * 4
    table = sizes.get("model.embed_tokens.weight", 0) if "lm_head.weight" in sizes else 0
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return {"parameters": sum(sizes.values()) // 4, "fp32_bytes": sum(sizes.values()), "fp32_read": sum(sizes.values()) - table,
            "layers": config["num_hidden_layers"], "kv_heads": config["num_key_value_heads"], "head_dim": head_dim,
            "vocab_size": config["vocab_size"]}


def converter(llama_src: Path, family: str) -> tuple[list[str], dict]:
    """The command that runs llama.cpp's convert_hf_to_gguf.py (arguments follow) and its environment."""
    vendor = llama_src / "vendor" / "llama.cpp"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(vendor / "gguf-py"), str(vendor)]))
    # The tiny tokenizer's hash is in no list of known pre-tokenizers: name the family's instead.
    convert = ("import sys, conversion.base as base, convert_hf_to_gguf as c; "
               f"base.TextModel.get_vocab_base_pre = lambda self, tokenizer: {PRE_TOKENIZER[family]!r}; "
               "sys.argv = ['convert_hf_to_gguf.py'] + sys.argv[1:]; c.main()")
    return [sys.executable, "-c", convert], env


def convert_mmproj(model_dir: Path, out_dir: Path, llama_src: Path, family: str) -> Path:
    """The VLM's vision tower and connector as llama.cpp's mmproj GGUF, F16 (convert_hf_to_gguf.py
    --mmproj reads only those tensors of the VLM directory)."""
    path = out_dir / "mmproj-f16.gguf"
    if not path.is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        convert, env = converter(llama_src, family)
        run_step([*convert, str(model_dir), "--mmproj", "--outfile", str(path), "--outtype", "f16"],
                 out_dir / "convert-mmproj-f16.log", env=env)
    return path


def convert_gguf(text_dir: Path, out_dir: Path, llama_src: Path, family: str, threads: int) -> dict[str, Path]:
    """GGUF F32/F16 by convert_hf_to_gguf.py (told the tiny tokenizer's pre-tokenizer), Q4_0/Q4_K_M
    by llama_model_quantize. Returns {type: path} for those that exist."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: out_dir / f"text-{kind.lower()}.gguf" for kind in GGUF_TYPES}
    convert, env = converter(llama_src, family)
    for kind in ("F32", "F16"):
        if not paths[kind].is_file():
            run_step([*convert, str(text_dir), "--outfile", str(paths[kind]), "--outtype", kind.lower()],
                     out_dir / f"convert-{kind.lower()}.log", env=env)
    for kind, ftype in GGUF_TYPES.items():
        if ftype is not None and not paths[kind].is_file():
            quantize = ("import ctypes, sys, llama_cpp; p = llama_cpp.llama_model_quantize_default_params(); "
                        f"p.ftype = {ftype}; p.nthread = {threads}; "
                        f"rc = llama_cpp.llama_model_quantize({str(paths['F32']).encode()!r}, {str(paths[kind]).encode()!r}, ctypes.byref(p)); "
                        "sys.exit(rc)")
            run_step([sys.executable, "-c", quantize], out_dir / f"quantize-{kind.lower()}.log")
    return {kind: path for kind, path in paths.items() if path.is_file()}


def build_genai(text_dir: Path, out_dir: Path, genai_python: str, precision: str, threads: int) -> Path:
    """onnxruntime-genai's model builder on the text model (CPU), intra_op_num_threads = threads."""
    if not (out_dir / "genai_config.json").is_file():
        cache = out_dir.with_name(out_dir.name + ".cache")
        run_step([genai_python, "-m", "onnxruntime_genai.models.builder", "-i", str(text_dir), "-o", str(out_dir),
                  "-p", precision, "-e", "cpu", "-c", str(cache)], out_dir.with_name(out_dir.name + ".log"))
        shutil.rmtree(cache, ignore_errors=True)
    config_file = out_dir / "genai_config.json"
    config = json.loads(config_file.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    options["intra_op_num_threads"] = threads
    options["inter_op_num_threads"] = 1
    config_file.write_text(json.dumps(config, indent=4))
    return out_dir


# ---- measuring one model -------------------------------------------------------------------------


def kv_bytes(text: dict, context: int, itemsize: int) -> int:
    return 2 * text["layers"] * text["kv_heads"] * text["head_dim"] * context * itemsize


def bundle_decoder_bytes(bundle: Path) -> int:
    manifest = json.loads((bundle / "manifest.json").read_text())
    graph = manifest["graphs"]["decoder"]
    return sum((bundle / name).stat().st_size for name in [graph["file"], *graph.get("data_files", [])])


def llamacpp_mtmd_spec(model_dir: Path, gguf_dir: Path, args: argparse.Namespace, family: str, bundle: Path) -> dict:
    """What the llama.cpp worker needs for its multimodal TTFT (the mmproj, edgetune's prompt, image
    and question), or {} when the family has no mtmd path here or no type asks for it."""
    if family not in MTMD_FAMILIES or "none" in args.llamacpp_ttft:
        return {}
    manifest = json.loads((bundle / "manifest.json").read_text())
    return {"mmproj": str(convert_mmproj(model_dir, gguf_dir, args.llama_src, family)), "mtmd_null": MTMD_FAMILIES[family],
            "single_turn": manifest["prompt"]["single_turn"], "image_placeholder": manifest["prompt"]["image_placeholder"],
            "tokenizer": str(bundle / manifest["tokenizer"]["file"]), "image_size": args.image_size,
            "question_tokens": args.question_tokens, "repeats": args.repeats}


def measure_model(name: str, args: argparse.Namespace, given: dict[str, Path], bandwidth: float) -> dict:
    work = args.work / name
    work.mkdir(parents=True, exist_ok=True)
    model_dir = model_dir_for(name, args.work, given)
    vlm_config = json.loads((model_dir / "config.json").read_text())
    family = vlm_config["model_type"]
    text_dir = extract_text_model(model_dir, work / "text")
    text = text_facts(text_dir)
    rows: list[dict] = []
    common = {"threads": args.threads, "decode_tokens": args.decode_tokens}

    # edgetune: every precision, from the tree under test and (optionally) the baseline tree
    trees = [("edgetune", args.edgetune_src)] + ([("edgetune baseline", args.baseline_src)] if args.baseline_src else [])
    prompt_tokens = image_tokens = None
    bundles = {}
    if "edgetune" in args.engines or "llamacpp" in args.engines or "genai" in args.engines or "torch" in args.engines:
        for precision in args.precisions:
            bundles[precision] = export_bundle(model_dir, work / "bundles" / precision, precision, args.export_src)
    for precision in args.precisions if "edgetune" in args.engines else []:
        for label, src in trees:
            log(f"{name}: {label} {precision}")
            spec = {**common, "bundle": str(bundles[precision]), "image_size": args.image_size,
                    "question_tokens": args.question_tokens, "repeats": args.repeats}
            result = run_worker("edgetune", spec, src=str(src) if src else None, threads=args.threads)
            weights = bundle_decoder_bytes(bundles[precision])
            vision = json.loads((bundles[precision] / "manifest.json").read_text()).get("vision_precision")
            rows.append({"engine": label, "precision": precision, "vision_precision": vision, "weights_read": weights,
                         "kv_itemsize": 4, **result})
            prompt_tokens = prompt_tokens or result.get("prompt_tokens")
            image_tokens = image_tokens or result.get("image_tokens")
    if prompt_tokens is None:  # edgetune not run or failed: ask a bundle for its prompt length
        result = run_worker("edgetune", {**common, "bundle": str(bundles[args.precisions[-1]]), "image_size": args.image_size,
                                         "question_tokens": args.question_tokens, "repeats": 1, "decode_tokens": 1},
                            threads=args.threads)
        prompt_tokens = result.get("prompt_tokens", 1024)
        image_tokens = result.get("image_tokens")
    peer = {**common, "prompt_tokens": prompt_tokens, "token_low": 10, "token_high": 400,
            "avoid": [vlm_config.get("image_token_id", -1), vlm_config.get("image_token_index", -1),
                      vlm_config.get("vision_start_token_id", -1), vlm_config.get("vision_end_token_id", -1)]}

    if "llamacpp" in args.engines:
        try:
            ggufs = convert_gguf(text_dir, work / "gguf", args.llama_src, family, args.threads)
            try:
                mtmd = llamacpp_mtmd_spec(model_dir, work / "gguf", args, family, bundles[args.precisions[-1]])
            except Exception as err:  # noqa: BLE001 (the text rows still run; the note says why TTFT is missing)
                mtmd = {"ttft_error": f"mmproj: {str(err).splitlines()[0]}"}
            for kind, path in ggufs.items():
                log(f"{name}: llama.cpp {kind}")
                spec = {**peer, "gguf": str(path), "llama_src": str(args.llama_src)}
                wants_ttft = kind in args.llamacpp_ttft or "all" in args.llamacpp_ttft
                result = run_worker("llamacpp", {**spec, **mtmd} if wants_ttft else spec, threads=args.threads)
                if wants_ttft and "ttft_error" in mtmd:
                    result["ttft_error"] = mtmd["ttft_error"]
                rows.append({"engine": "llama.cpp", "precision": kind, "kv_itemsize": 2, "edgetune_image_tokens": image_tokens,
                             **result})
        except Exception as err:  # noqa: BLE001 (a missing build or converter: say so in the table)
            rows.append({"engine": "llama.cpp", "precision": "-", "error": str(err).splitlines()[0]})
    if "genai" in args.engines:
        if not args.genai_python:
            rows.append({"engine": "ort-genai", "precision": "-", "error": "skipped: no --genai-python"})
        else:
            for precision in GENAI_PRECISIONS:
                try:
                    model = build_genai(text_dir, work / f"genai-{precision}", args.genai_python, precision, args.threads)
                    log(f"{name}: onnxruntime-genai {precision}")
                    result = run_worker("genai", {**peer, "model_dir": str(model)}, python=args.genai_python, threads=args.threads)
                except Exception as err:  # noqa: BLE001 (a failed build: say so in the table)
                    result = {"error": str(err).splitlines()[0]}
                rows.append({"engine": "ort-genai", "precision": precision, "kv_itemsize": 4, **result})
    if "torch" in args.engines:
        log(f"{name}: PyTorch eager fp32")
        result = run_worker("torch", {**peer, "model_dir": str(model_dir)}, threads=args.threads)
        rows.append({"engine": "torch eager", "precision": "fp32", "weights_read": text["fp32_read"], "kv_itemsize": 4, **result})

    context = prompt_tokens + WARMUP_STEPS + args.decode_tokens // 2  # the middle of the timed window
    for row in rows:
        if "weights_read" in row:
            row["bytes_per_token"] = row["weights_read"] + kv_bytes(text, context, row["kv_itemsize"])
            row["roofline_tok_s"] = bandwidth * GB / row["bytes_per_token"]
            if row.get("decode_tok_s"):
                row["roofline_pct"] = 100 * row["decode_tok_s"] / row["roofline_tok_s"]
    return {"model": name, "family": family, "model_dir": str(model_dir), "text": text, "prompt_tokens": prompt_tokens,
            "context_mid": context, "rows": rows}


# ---- report --------------------------------------------------------------------------------------


def fmt(value, spec: str = ".1f") -> str:
    return "" if value is None else format(value, spec)


def table(report: dict, bandwidth: float) -> str:
    text = report["text"]
    lines = [
        (f"### {report['model']} ({report['family']}): text model {text['parameters'] / 1e6:.1f}M parameters, "
         f"{report['prompt_tokens']} prompt tokens, KV at {report['context_mid']} tokens, bandwidth {bandwidth:.1f} GB/s"),
        "",
        ("| engine | precision | MB read/token | prefill tok/s | decode tok/s | decode tok/s at p50 step | roofline tok/s | % of roofline | "
         "TTFT s | preproc s | vision s | prefill s | peak RSS GB | load before | note |"),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in report["rows"]:
        note = row.get("error", "")
        if row.get("prefill_excludes_vision") is False:
            note = "prefill = forward - vision"
        if row["engine"].startswith("edgetune") and row.get("edgetune_file"):
            note = (note + "; " if note else "") + f"vision {row.get('vision_precision')}; src {Path(row['edgetune_file']).parent.parent}"
        if row["engine"] == "llama.cpp":
            note = llamacpp_note(row, note)
        lines.append(
            f"| {row['engine']} | {row['precision']} | {fmt(row.get('bytes_per_token') and row['bytes_per_token'] / MB, '.0f')} | "
            f"{fmt(row.get('prefill_tok_s'), '.0f')} | {fmt(row.get('decode_tok_s'))} | "
            f"{fmt(row.get('decode_step_ms_p50') and 1e3 / row['decode_step_ms_p50'])} | {fmt(row.get('roofline_tok_s'))} | "
            f"{fmt(row.get('roofline_pct'), '.0f')} | {fmt(row.get('ttft_s'), '.2f')} | {fmt(row.get('preprocess_s'), '.3f')} | "
            f"{fmt(row.get('vision_s'), '.2f')} | {fmt(row.get('prefill_s'), '.2f')} | "
            f"{fmt(row.get('peak_rss') and row['peak_rss'] / GB, '.2f')} | {fmt(row.get('load1_before'))} | {note} |")
    return "\n".join(lines)


def llamacpp_note(row: dict, note: str) -> str:
    """A llama.cpp row's note: where its TTFT and prefill come from, and its frames and image tokens
    beside edgetune's."""
    parts = [note] if note else []
    if "ttft_s" in row:
        parts.append(f"TTFT, prefill: mtmd, mmproj F16, {row['frames']} frames, {row['image_tokens']} image tokens "
                     f"(edgetune {row.get('edgetune_image_tokens')}), {row['mtmd_prompt_tokens']} prompt tokens; "
                     f"text-only prefill {row['text_prefill_tok_s']:.0f} tok/s")
    elif row.get("ttft_error"):
        parts.append(f"TTFT failed: {row['ttft_error']}")
    return "; ".join(parts)


def pick(rows: list[dict], engine: str, precision: str, key: str) -> float:
    for row in rows:
        if row["engine"] == engine and row["precision"] == precision and row.get(key) is not None:
            return row[key]
    return float("nan")


def result_line(report: dict) -> str:
    rows = report["rows"]
    values = {
        "int4_tok_s": pick(rows, "edgetune", "int4", "decode_tok_s"),
        "llamacpp_q4_0_tok_s": pick(rows, "llama.cpp", "Q4_0", "decode_tok_s"),
        "ortgenai_int4_tok_s": pick(rows, "ort-genai", "int4", "decode_tok_s"),
        "roofline_tok_s": pick(rows, "edgetune", "int4", "roofline_tok_s"),
        "ttft_s": pick(rows, "edgetune", "int4", "ttft_s"),
        "llamacpp_ttft_s": pick(rows, "llama.cpp", "Q4_0", "ttft_s"),
    }
    return f"RESULT model={report['model']} " + " ".join(f"{k}=nan" if math.isnan(v) else f"{k}={v:.2f}" for k, v in values.items())


def machine(threads: int) -> dict:
    import onnxruntime

    facts = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": threads,
             "onnxruntime": onnxruntime.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M"),
             "loadavg_at_start": os.getloadavg(),
             "git": subprocess.run(["git", "-C", str(HERE), "describe", "--always", "--dirty"], capture_output=True, text=True, check=False).stdout.strip()}
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            facts["cpu"] = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import llama_cpp

        facts["llama_cpp_python"] = llama_cpp.__version__
    except ImportError:
        facts["llama_cpp_python"] = None
    return facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of every engine and of the bandwidth probe")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-runtime"), help="models, bundles, GGUFs (reused when present)")
    parser.add_argument("--model-dir", action="append", default=[], metavar="NAME=DIR", help="reuse a built VLM directory")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="edgetune bundle precisions")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated subset of {', '.join(ENGINES)}")
    parser.add_argument("--edgetune-src", type=Path, default=None, help="run the runtime from this source tree (PYTHONPATH) instead of the installed one")
    parser.add_argument("--baseline-src", type=Path, default=None, help="also run the runtime from this tree, side by side")
    parser.add_argument("--export-src", type=Path, default=None,
                        help="export missing bundles with the edgetune in this tree (default: the installed one); "
                             "bundles already under --work are reused as they are")
    parser.add_argument("--llama-src", type=Path, default=None,
                        help="unpacked llama-cpp-python sdist (vendor/llama.cpp has convert_hf_to_gguf.py); "
                             "default: `pip download --no-binary :all: llama-cpp-python==<installed>` into --work")
    parser.add_argument("--llamacpp-ttft", default="Q4_0",
                        help=f"GGUF types whose llama.cpp row also measures the multimodal TTFT: comma-separated from "
                             f"{', '.join(GGUF_TYPES)}, or all, or none (each costs 1 + --repeats image encodes)")
    parser.add_argument("--genai-python", default=None, help="python of a virtualenv with onnxruntime-genai (see the docstring)")
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--question-tokens", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="TTFT runs after the warm-up (median)")
    parser.add_argument("--bandwidth-gb", type=float, default=1.0, help="GB streamed per thread by the bandwidth probe")
    args = parser.parse_args()
    if args.worker:
        result = WORKERS[args.worker](json.loads(args.spec))
        print(WORKER_TAG + json.dumps(result), flush=True)
        return

    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model {unknown[0]}; pick from {', '.join(MODELS)}")
    args.engines = [e for e in args.engines.split(",") if e]
    args.precisions = [p for p in args.precisions.split(",") if p]
    args.llamacpp_ttft = [t for t in args.llamacpp_ttft.split(",") if t]
    unknown = [t for t in args.llamacpp_ttft if t not in (*GGUF_TYPES, "all", "none")]
    if unknown:
        parser.error(f"unknown --llamacpp-ttft type {unknown[0]}; pick from {', '.join(GGUF_TYPES)}, all, none")
    args.work = args.work.resolve()
    args.edgetune_src = args.edgetune_src.resolve() if args.edgetune_src else None
    args.baseline_src = args.baseline_src.resolve() if args.baseline_src else None
    args.export_src = args.export_src.resolve() if args.export_src else None
    given = {}
    for item in args.model_dir:
        name, _, path = item.partition("=")
        given[name] = Path(path).resolve()
    if "llamacpp" in args.engines and args.llama_src is None:
        args.llama_src = fetch_llama_src(args.work)
    facts = machine(args.threads)
    log(f"machine: {json.dumps(facts)}")

    bandwidth_spec = {"threads": args.threads, "gb_per_thread": args.bandwidth_gb, "repeats": 5}
    before = run_worker("bandwidth", bandwidth_spec, threads=args.threads)
    log(f"bandwidth before: {before}")
    reports = []
    for name in models:
        reports.append(measure_model(name, args, given, before.get("read_gb_s", float("nan"))))
    after = run_worker("bandwidth", bandwidth_spec, threads=args.threads)
    log(f"bandwidth after: {after}")
    bandwidth = max(before.get("read_gb_s", 0), after.get("read_gb_s", 0))
    for report in reports:  # rescale to the larger of the two measurements
        for row in report["rows"]:
            if "bytes_per_token" in row:
                row["roofline_tok_s"] = bandwidth * GB / row["bytes_per_token"]
                if row.get("decode_tok_s"):
                    row["roofline_pct"] = 100 * row["decode_tok_s"] / row["roofline_tok_s"]
    for report in reports:
        print(table(report, bandwidth) + "\n", flush=True)
    print(f"machine: {json.dumps(facts)}")
    print(f"bandwidth (numpy, {args.threads} threads, read GB/s): before {json.dumps(before)}, after {json.dumps(after)}")
    (args.work / "bench_runtime.json").write_text(json.dumps({"machine": facts, "bandwidth": [before, after], "reports": reports}, indent=1))
    print(f"details: {args.work / 'bench_runtime.json'}")
    for report in reports:
        print(result_line(report), flush=True)


def fetch_llama_src(work: Path) -> Path:
    """The llama-cpp-python sdist matching the installed version, unpacked (for convert_hf_to_gguf.py)."""
    import tarfile

    import llama_cpp

    version = llama_cpp.__version__
    target = work / "sdist" / f"llama_cpp_python-{version}"
    if not (target / "vendor/llama.cpp/convert_hf_to_gguf.py").is_file():
        run_step([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", f"llama-cpp-python=={version}",
                  "-d", str(work / "sdist")], work / "sdist.log")
        with tarfile.open(next((work / "sdist").glob(f"llama_cpp_python-{version}.tar.gz"))) as archive:
            archive.extractall(work / "sdist")
    return target


if __name__ == "__main__":
    main()
