"""Random-weight models at the published sizes of real checkpoints, for memory and speed benchmarks.

Model hubs are out of reach here, so a benchmark that needs a real model's shape builds one:
``build("qwen2-vl-2b", out_dir)`` writes a transformers model directory whose config has the sizes
of Qwen/Qwen2-VL-2B-Instruct (benchmarks/configs/qwen2-vl-2b.json; where each number comes from is
in benchmarks/configs/README.md) and whose weights are random, with the family's tiny tokenizer and
processor (FAMILIES[family].build_tiny) set to the checkpoint's image-processor settings. edgetune
loads it through the same ``from_pretrained`` path as a user's model directory. The tiny tokenizer's
ids are all below the real vocabulary size, and the special-token ids in the config are the tiny
tokenizer's, so prompts and image placeholders stay consistent.

Weights are written shard by shard and never all at once: the model is built on the meta device,
then one module group at a time (a decoder layer, the embedding table, ...) is materialized on the
CPU, initialized with transformers' own ``_init_weights`` and written to its safetensors shard, then
dropped. Building takes about one shard (``max_shard_size``) plus one module group of RAM, whatever
the model's size. Keys, shard names and the index are what ``save_pretrained`` writes (checked in
tests/test_real_shapes.py). Writing safetensors shards from a streamed state dict is done by hand
here because transformers' save_pretrained needs the whole model in memory.

    python benchmarks/real_shapes.py qwen2-vl-2b --out /tmp/qwen2-vl-2b [--dtype float32]
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_SHARD_BYTES = 2 * 1024**3
GROUP_BYTES = 256 * 1024**2  # a module group is materialized whole below this size
# Keys the tiny config writes that transformers derives from the others; stale after a resize.
DERIVED_KEYS = {"layer_types"}


def shape_names() -> list[str]:
    return sorted(path.stem for path in CONFIG_DIR.glob("*.json"))


def load_spec(name: str) -> dict:
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise SystemExit(f"unknown shape '{name}'; known: {', '.join(shape_names())} (files in {CONFIG_DIR})")
    return json.loads(path.read_text())


def deep_merge(base: dict, changes: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "rope_scaling":
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def drop_derived(config: dict) -> dict:
    return {k: drop_derived(v) if isinstance(v, dict) else v for k, v in config.items() if k not in DERIVED_KEYS}


def real_config(spec: dict, tiny_dir: Path) -> Any:
    """The tiny model's config (token ids, architecture flags) with the spec's published sizes."""
    from transformers import AutoConfig

    tiny = json.loads((tiny_dir / "config.json").read_text())
    merged = drop_derived(deep_merge(tiny, spec["config"]))
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "config.json").write_text(json.dumps(merged))
        return AutoConfig.from_pretrained(scratch)


def meta_model(family: Any, config: Any) -> Any:
    with torch.device("meta"):
        model = family.model_class()(config)
    model.tie_weights()
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # shared (tied) parameters once


# ---- streaming writer ----------------------------------------------------------------------------


def saved_key(model: Any, name: str) -> str:
    """The key save_pretrained writes for ``name``: VLMs save under their legacy names (the reverse
    of _checkpoint_conversion_mapping), exactly as transformers 4.57's save_pretrained rewrites them."""
    for pattern, replacement in {v: k for k, v in (model._checkpoint_conversion_mapping or {}).items()}.items():
        replacement = re.sub(r"\(.*\)", "", replacement.lstrip("^"))
        name, count = re.subn(pattern, replacement, name)
        if count:
            break
    return name


def saved_tensors(model: torch.nn.Module) -> dict[str, tuple[int, tuple[int, ...]]]:
    """name -> (id of the tensor object, shape) for every tensor save_pretrained keeps, in state_dict
    order; a tied parameter is kept under its first name (lm_head.weight follows embed_tokens)."""
    objects = dict(model.named_parameters(remove_duplicate=False))
    objects.update(dict(model.named_buffers(remove_duplicate=False)))
    seen, kept = set(), {}
    for name in model.state_dict(keep_vars=True):
        obj = objects[name]
        if id(obj) not in seen:
            seen.add(id(obj))
            kept[name] = (id(obj), tuple(obj.shape))
    return kept


def shard_plan(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """save_pretrained's greedy split: a new shard when the next tensor would overflow this one."""
    shards, current, total = [], [], 0
    for name, size in sizes.items():
        if current and total + size > max_shard_bytes:
            shards.append(current)
            current, total = [], 0
        current.append(name)
        total += size
    return shards + [current] if current else shards


def module_groups(module: torch.nn.Module, limit: int, prefix: str = "") -> list[tuple[str, torch.nn.Module, bool]]:
    """(qualified name, module, whole) in module order: ``whole`` groups are materialized with their
    children; a larger module contributes its own direct tensors (whole=False) and recurses."""
    size = sum(t.numel() * t.element_size() for t in {id(t): t for t in module.state_dict(keep_vars=True).values()}.values())
    children = list(module.named_children())
    if size <= limit or not children:
        return [(prefix, module, True)]
    groups = [(prefix, module, False)]
    for name, child in children:
        groups += module_groups(child, limit, f"{prefix}{name}.")
    return groups


def init_group(module: torch.nn.Module, owner: Any, whole: bool) -> None:
    """transformers' initialization of ``module`` (post-order, as PreTrainedModel.initialize_weights
    runs it; a nested PreTrainedModel, such as a vision tower, initializes its own modules)."""
    from transformers import PreTrainedModel

    if whole:
        for child in module.children():
            init_group(child, child if isinstance(child, PreTrainedModel) else owner, True)
    owner._init_weights(module)


def owner_of(model: Any, qualified: str) -> Any:
    """The innermost PreTrainedModel containing the module named ``qualified`` (prefix form, 'a.b.')."""
    from transformers import PreTrainedModel

    owner, module = model, model
    for part in [p for p in qualified.split(".") if p]:
        module = getattr(module, part) if not part.isdigit() else module[int(part)]
        if isinstance(module, PreTrainedModel):
            owner = module
    return owner


@torch.no_grad()
def write_weights(
    model: Any, out_dir: Path, dtype: torch.dtype, max_shard_bytes: int = DEFAULT_SHARD_BYTES, seed: int = 0
) -> dict:
    """Materialize, initialize and write ``model`` (on the meta device) group by group; returns
    {"files": [...], "total_bytes": n}. A shard is written as soon as all its tensors exist."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    kept = saved_tensors(model)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    sizes = {name: itemsize * int(torch.Size(shape).numel()) for name, (_, shape) in kept.items()}
    plan = shard_plan(sizes, max_shard_bytes)
    files = ["model.safetensors"] if len(plan) == 1 else [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    shard_of = {name: i for i, names in enumerate(plan) for name in names}
    pending: list[dict[str, torch.Tensor]] = [{} for _ in plan]
    wanted = {ident: name for name, (ident, _) in kept.items()}
    for qualified, module, whole in module_groups(model, GROUP_BYTES):
        tensors = dict(module.named_parameters(recurse=whole, remove_duplicate=False))
        tensors.update(dict(module.named_buffers(recurse=whole, remove_duplicate=False)))
        names = {id(t): wanted[id(t)] for t in tensors.values() if id(t) in wanted}
        if not names:
            continue  # tied to tensors already written (lm_head), or nothing saved here
        before: dict[int, str] = {}
        for local, tensor in tensors.items():
            before.setdefault(id(tensor), local)
        module.to_empty(device="cpu", recurse=whole)
        init_group(module, owner_of(model, qualified), whole)
        after = dict(module.named_parameters(recurse=whole, remove_duplicate=False))
        after.update(dict(module.named_buffers(recurse=whole, remove_duplicate=False)))
        for ident, name in names.items():
            shard = shard_of[name]
            pending[shard][saved_key(model, name)] = after[before[ident]].detach().to(dtype).contiguous()
            del wanted[ident]
        module.to_empty(device="meta", recurse=whole)  # our references are now the only ones
        for shard, names_in_shard in enumerate(plan):
            if pending[shard] and len(pending[shard]) == len(names_in_shard):
                save_file(pending[shard], str(out_dir / files[shard]), metadata={"format": "pt"})
                pending[shard] = {}
    if wanted:
        raise RuntimeError(f"tensors never materialized: {sorted(wanted.values())[:5]}")
    total = sum(sizes.values())
    if len(files) > 1:
        weight_map = {saved_key(model, name): files[shard_of[name]] for name in kept}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return {"files": files, "total_bytes": total}


# ---- the model directory ---------------------------------------------------------------------------


def copy_processor_files(tiny_dir: Path, out_dir: Path, changes: dict[str, dict]) -> None:
    """Everything of the tiny directory but its weights and config, with the checkpoint's
    image-processor settings written into the named JSON files."""
    for path in tiny_dir.iterdir():
        if path.name not in ("config.json", "model.safetensors") and path.is_file():
            shutil.copy2(path, out_dir / path.name)
    for file, settings in changes.items():
        target = out_dir / file
        data = json.loads(target.read_text()) if target.is_file() else {}
        target.write_text(json.dumps(deep_merge(data, settings), indent=2, sort_keys=True) + "\n")


def build_from_spec(spec: dict, out_dir: Path, dtype: str = "float32", max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                    config_only: bool = False) -> dict:
    """Write the model directory ``out_dir`` for ``spec`` (a configs/*.json document); returns a summary.
    ``config_only``: config, tokenizer and processor files without weights, what ``edgetune plan``
    reads (as from the hub before a download)."""
    from edgetune.families import FAMILIES

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*out_dir.glob("model*.safetensors"), *out_dir.glob("model.safetensors.index.json")]:
        stale.unlink()  # an earlier build's shards would be read beside this one's
    family = FAMILIES[spec["family"]]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        tiny_dir = Path(scratch)
        family.build_tiny(tiny_dir)
        config = real_config(spec, tiny_dir)
        copy_processor_files(tiny_dir, out_dir, spec.get("processor_files", {}))
    config.dtype = DTYPES[dtype]
    model = meta_model(family, config)
    parameters = count_parameters(model)
    if config_only:
        written = {"files": [], "total_bytes": 0}
    else:
        written = write_weights(model, out_dir, DTYPES[dtype], max_shard_bytes)
    model.config.save_pretrained(out_dir)
    return {
        "checkpoint": spec.get("checkpoint"),
        "family": family.name,
        "dir": str(out_dir),
        "dtype": dtype,
        "parameters": parameters,
        "published_parameters": spec.get("published_parameters"),
        "weights_bytes": written["total_bytes"],
        "fp32_bytes": 4 * parameters,
        "files": written["files"],
        "build_s": round(time.perf_counter() - started, 1),
        "build_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def build(name: str, out_dir: Path, dtype: str = "float32", max_shard_bytes: int = DEFAULT_SHARD_BYTES,
          config_only: bool = False) -> dict:
    """Build the real-shape model ``name`` (a file stem in benchmarks/configs/) into ``out_dir``."""
    return build_from_spec(load_spec(name), out_dir, dtype, max_shard_bytes, config_only)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=shape_names())
    parser.add_argument("--out", type=Path, required=True, help="model directory to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="weights on disk (default float32; the configs name each checkpoint's published dtype)")
    parser.add_argument("--max-shard-gb", type=float, default=DEFAULT_SHARD_BYTES / 1024**3)
    parser.add_argument("--config-only", action="store_true", help="config, tokenizer and processor files, no weights (for edgetune plan)")
    args = parser.parse_args(argv)
    summary = build(args.name, args.out, args.dtype, int(args.max_shard_gb * 1024**3), args.config_only)
    gib = 1024**3
    print(
        f"{args.name}: {summary['parameters'] / 1e6:.1f}M parameters (published {summary['published_parameters'] / 1e6:.1f}M), "
        f"{summary['weights_bytes'] / gib:.2f} GiB {args.dtype} in {len(summary['files'])} file(s), "
        f"built in {summary['build_s']}s, peak RSS {summary['build_peak_rss_bytes'] / gib:.2f} GiB -> {args.out}",
        file=sys.stderr,
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
