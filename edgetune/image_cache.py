"""train.cache_image_features: the frozen vision tower runs once per image; training reads its
outputs from a cache on disk and the tower's weights leave memory.

Contract. When no parameter of the vision tower requires grad and images are not augmented
(edgetune never augments them), the tower's output for an image is the same at every step.
``cache_image_features`` then, before training:
  1. replaces the tower inside the model by a ``CachedVisionTower``: a module without weights,
     called exactly as the model calls the tower, that returns the tower's output for each image
     it is handed, looked up by the image's key;
  2. runs every training and held-out sample's images through the real tower once (one sample at
     a time, no grad, the batches' own dtype and autocast), writing each image's output that is not
     cached yet;
  3. drops the real tower, so its weights are freed.
Everything from the connector on (the connector itself, trainable or not, and any method module
hooked on it) runs and trains as before: the losses are those of the plain path, to float
tolerance (the tower saw one sample at a time instead of the training batch). Refused with a
UserError: a tower parameter that requires grad (its output changes every step), a tower with
dropout (its output differs every epoch).

What is cached is the input of the connector, i.e. only what the model reads from the frozen part
(the family's ``image_cache_call``, an ``ImageCacheCall``):
  RowwiseCall      every tensor argument of the tower holds one row per image, crop or tile; the
                   model reads named outputs of it: LLaVA / LLaVA-NeXT the hidden states of
                   ``vision_feature_layer`` only (not every layer's), PaliGemma and Idefics3 /
                   SmolVLM ``last_hidden_state``.
  MergerInputCall  Qwen2-VL / Qwen2.5-VL, whose tower ends in the connector (``visual.merger``):
                   the merger's input per image (patch embedding, rotary positions and every
                   block), in the image's own patch order; the stand-in keeps the merger and runs it.

The key of an image is the sha256 of what the model hands the tower for that image: each tensor's
name, dtype, shape and bytes (pixels after the processor, plus Qwen's grid (t, h, w) or Idefics3's
patch mask) and the call's other arguments. Processor settings (sizes, pinpoints, tiling,
normalization) and the image file's content reach the tower only through those tensors, so a
change to either is a new key, and two settings that give the same tensors share one entry, as
they must. The folder is named by the model fingerprint: the frozen weights' own digest, the
tower's class and config, what is read from it, the compute dtype and device type, and the torch
and transformers versions; any change to those is a new folder.

Location and layout (safetensors and JSON only, never pickles; each file written to a temporary
name and renamed into place, so a killed run leaves no half-written entry):
  $EDGETUNE_CACHE_DIR/image-features/, else $XDG_CACHE_HOME/edgetune/image-features/, else
  ~/.cache/edgetune/image-features/
    <model fingerprint, 16 hex>/
      fingerprint.json                what the fingerprint was computed from
      <key[:2]>/<key>.safetensors     one image's tensors, named as the model reads them
                                      ("last_hidden_state", "hidden_states.22", "merger_input")
Delete a folder to free its space; a later run recomputes what it needs.

Hand-written: no library caches a transformers model's intermediate outputs by input content.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgetune.errors import UserError
from edgetune.families.base import get_module
from edgetune.progress import console, step_progress

FORMAT = "edgetune-image-features/1"
KEY = "train.cache_image_features"


def cache_root() -> Path:
    """The folder holding every model's image-feature cache (see the module docstring)."""
    if os.environ.get("EDGETUNE_CACHE_DIR"):
        return Path(os.environ["EDGETUNE_CACHE_DIR"]) / "image-features"
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "edgetune" / "image-features"


# ---- how a model calls its frozen tower ----------------------------------------------------------


class ImageCacheCall:
    """How a model calls its frozen vision tower, split into images.

    ``path``: the dotted module the cache stands in for. ``keep``: children of it that are not
    frozen and stay in the stand-in under the same names (Qwen's merger). ``attributes``: plain
    attributes of the tower the model reads (Qwen: spatial_merge_size). ``arguments`` below is one
    call's arguments by the tower's parameter names.
    """

    path: str
    keep: tuple[str, ...] = ()
    attributes: tuple[str, ...] = ()

    def split(self, arguments: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        """One call -> per image, the tensors that determine its output (what its key hashes)."""
        raise NotImplementedError

    def run(self, tower: torch.nn.Module, images: list[dict[str, torch.Tensor]], arguments: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        """The real tower on ``images`` (from ``split``) -> per image, the tensors to cache."""
        raise NotImplementedError

    def assemble(self, stand_in: CachedVisionTower, entries: list[dict[str, torch.Tensor]], arguments: dict[str, Any]) -> Any:
        """Per-image cached tensors, in the call's image order -> what the tower returns to the model."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What of the tower is cached, for the fingerprint."""
        return {"call": type(self).__name__, **vars(self)}


class RowwiseCall(ImageCacheCall):
    """Every tensor argument has one row per image (or crop, or tile): pixel_values [images, 3, H, W],
    Idefics3's patch_attention_mask [images, h, w]; the model reads ``fields`` of the output:
    "last_hidden_state", or "hidden_states.<i>" (layer i of ``hidden_states``, which has
    ``hidden_states_count`` entries; the others are returned as None)."""

    def __init__(self, path: str, fields: tuple[str, ...], hidden_states_count: int | None = None):
        self.path, self.fields, self.hidden_states_count = path, tuple(fields), hidden_states_count

    def split(self, arguments):
        tensors = {name: value for name, value in arguments.items() if isinstance(value, torch.Tensor)}
        counts = {len(t) for t in tensors.values()}
        if len(counts) != 1:
            shapes = {name: tuple(t.shape) for name, t in tensors.items()}
            raise RuntimeError(f"{KEY}: expected one row per image in every tensor argument of {self.path}, got {shapes}")
        return [{name: t[i] for name, t in tensors.items()} for i in range(counts.pop())]

    def run(self, tower, images, arguments):
        stacked = {name: torch.stack([image[name] for image in images]) for name in images[0]}
        output = tower(**{**arguments, **stacked})
        if self.hidden_states_count is not None and len(output.hidden_states) != self.hidden_states_count:
            raise RuntimeError(f"{KEY}: {self.path} returned {len(output.hidden_states)} hidden states, expected {self.hidden_states_count}")
        read = {field: self._read(output, field) for field in self.fields}
        return [{field: rows[i].clone() for field, rows in read.items()} for i in range(len(images))]

    def assemble(self, stand_in, entries, arguments):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        stacked = {field: torch.stack([entry[field] for entry in entries]) for field in self.fields}
        hidden_states = None
        if self.hidden_states_count is not None:
            layers = [None] * self.hidden_states_count
            for field, tensor in stacked.items():
                if field.startswith("hidden_states."):
                    layers[int(field.split(".")[1])] = tensor
            hidden_states = tuple(layers)
        return BaseModelOutputWithPooling(last_hidden_state=stacked.get("last_hidden_state"), hidden_states=hidden_states)

    @staticmethod
    def _read(output: Any, field: str) -> torch.Tensor:
        if field.startswith("hidden_states."):
            return output.hidden_states[int(field.split(".")[1])]
        return getattr(output, field)


class MergerInputCall(ImageCacheCall):
    """Qwen2-VL / Qwen2.5-VL: ``visual(hidden_states=patches [sum t*h*w, dim], grid_thw [images, 3])``
    runs the frozen part, then the merger (the connector), which joins each run of merge**2
    consecutive rows into one LLM token. The cache holds the merger's input per image; Qwen2.5-VL's
    blocks see an image's merge units window by window, so its rows are put back in the image's
    own order first, which is the order the tower's output ends in (the merger treats every unit
    on its own, so merging and reordering commute)."""

    def __init__(self, path: str, merger: str, windowed: bool):
        self.path, self.merger, self.windowed = path, merger, windowed
        self.keep, self.attributes = (merger,), ("spatial_merge_size",)

    def split(self, arguments):
        grid = arguments["grid_thw"]
        patches = arguments["hidden_states"].split(grid.prod(-1).tolist())
        return [{"hidden_states": rows, "grid_thw": thw} for rows, thw in zip(patches, grid)]

    def run(self, tower, images, arguments):
        grid = torch.stack([image["grid_thw"] for image in images])
        captured: list[torch.Tensor] = []
        handle = getattr(tower, self.merger).register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:
            tower(torch.cat([image["hidden_states"] for image in images]), grid_thw=grid)
        finally:
            handle.remove()
        rows = captured[0]
        if self.windowed:
            window_index, _ = tower.get_window_index(grid)
            units = rows.reshape(len(window_index), -1, rows.shape[-1])
            rows = units[torch.argsort(window_index)].reshape(rows.shape)
        return [{"merger_input": part.clone()} for part in rows.split(grid.prod(-1).tolist())]

    def assemble(self, stand_in, entries, arguments):
        return getattr(stand_in, self.merger)(torch.cat([entry["merger_input"] for entry in entries]))


# ---- the cache on disk and the stand-in ---------------------------------------------------------------


class FeatureStore:
    """One model fingerprint's folder: image key -> safetensors file of that image's tensors."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.used: set[str] = set()  # keys looked up since this store was made
        self.written = 0

    @staticmethod
    def key(image: dict[str, torch.Tensor], settings: dict[str, Any]) -> str:
        digest = hash_tensors(hashlib.sha256(FORMAT.encode()), image)
        digest.update(json.dumps(settings, sort_keys=True, default=repr).encode())
        return digest.hexdigest()

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    def read(self, key: str, device: torch.device) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        self.used.add(key)
        return load_file(str(self.path(key)), device=str(device))

    def write(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        self.used.add(key)
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        cpu = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
        with atomic_file(path) as scratch:
            save_file(cpu, str(scratch), metadata={"format": FORMAT})
        self.written += 1

    def size_bytes(self, keys: set[str]) -> int:
        return sum(self.path(key).stat().st_size for key in keys if key in self)


class atomic_file:
    """``with atomic_file(path) as scratch:`` write scratch; it becomes ``path`` only on success."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __enter__(self) -> Path:
        fd, name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".partial", dir=self.path.parent)
        os.close(fd)
        self.scratch = Path(name)
        return self.scratch

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            os.replace(self.scratch, self.path)
        else:
            self.scratch.unlink(missing_ok=True)


class CachedVisionTower(torch.nn.Module):
    """Stands in for the frozen tower: called as the model calls the tower, it returns the tower's
    output for the images it is handed, from the cache. While the real tower is attached
    (``cache_image_features`` filling the cache) images not cached yet go through it and are
    written; after ``drop_tower`` an image not in the cache is an error."""

    def __init__(self, tower: torch.nn.Module, call: ImageCacheCall, store: FeatureStore):
        super().__init__()
        self.call, self.store = call, store
        self.signature = inspect.signature(tower.forward)
        self.tower_dtype = next(tower.parameters()).dtype
        self.config = getattr(tower, "config", None)
        for name in call.keep:
            self.add_module(name, getattr(tower, name))  # the same module object: its names and state stay
        for name in call.attributes:
            setattr(self, name, getattr(tower, name))
        self.__dict__["tower"] = tower  # not registered: no part of the model's parameters or state_dict
        self.tower_runs = 0  # forwards of the real tower (filling only)

    @property
    def dtype(self) -> torch.dtype:
        """The frozen tower's dtype: models cast pixels to it (Qwen2-VL, Idefics3)."""
        return self.tower_dtype

    def drop_tower(self) -> None:
        self.__dict__["tower"] = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        arguments = self.bind(args, kwargs)
        images = self.call.split(arguments)
        settings = {name: value for name, value in arguments.items() if not isinstance(value, torch.Tensor)}
        keys = [self.store.key(image, settings) for image in images]
        device = next(iter(images[0].values())).device
        entries: dict[str, dict[str, torch.Tensor]] = {}
        missing: dict[str, dict[str, torch.Tensor]] = {}
        for key, image in zip(keys, images):
            if key in entries or key in missing:
                continue
            if key in self.store:
                entries[key] = self.store.read(key, device)
            else:
                missing[key] = image
        if missing:
            if self.tower is None:
                raise RuntimeError(
                    f"{KEY}: an image reached the vision tower that is not in {self.store.folder}; "
                    "only the training and held-out samples' images were computed before training"
                )
            with torch.no_grad():
                computed = self.call.run(self.tower, list(missing.values()), arguments)
            self.tower_runs += 1
            for key, tensors in zip(missing, computed):
                self.store.write(key, tensors)
                entries[key] = tensors
        return self.call.assemble(self, [entries[key] for key in keys], arguments)

    def bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """The call's arguments by the tower's parameter names, floating tensors in the tower's dtype
        (as the model casts them for the tower; a no-op where it does not)."""
        bound = self.signature.bind(*args, **kwargs).arguments
        arguments: dict[str, Any] = {}
        for name, value in bound.items():
            if self.signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(value)
            else:
                arguments[name] = value
        return {
            name: value.to(self.tower_dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value
            for name, value in arguments.items()
        }


# ---- before training ----------------------------------------------------------------------------------


@dataclass
class ImageCacheReport:
    folder: str
    images: int  # distinct images (crops, tiles) in the samples
    computed: int  # of them, run through the tower now; the others were cached already
    cache_mb: float  # their files on disk
    tower_mb: float  # the frozen tower's weights, freed
    seconds: float


def cache_image_features(model: Any, backbone: Any, samples: list[Any], max_length: int,
                         device: torch.device, dtype: torch.dtype) -> ImageCacheReport:
    """Stand the cache in for ``backbone``'s frozen vision tower in ``model`` (the backbone after the
    method was attached), fill it for ``samples`` and free the tower (see the module docstring)."""
    # the batches training will see: same dtype, same autocast
    from edgetune.data import collate
    from edgetune.train import autocast, to_device

    start = time.perf_counter()
    family, processor = backbone.family, backbone.processor
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    call = family.image_cache_call(hf_model)
    tower = get_module(hf_model, call.path)
    frozen = frozen_part(tower, call)
    check_cacheable(call, tower, frozen)
    store = FeatureStore(model_folder(hf_model, family, tower, call, frozen, device, dtype))
    stand_in = CachedVisionTower(tower, call, store)
    parent, _, child = call.path.rpartition(".")
    setattr(get_module(hf_model, parent) if parent else hf_model, child, stand_in)
    tower_bytes = sum(t.numel() * t.element_size() for t in frozen.values())
    pad_id = processor.tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), step_progress("image features") as progress:
            task = progress.add_task("image features", total=len(samples), stats="")
            for sample in samples:
                batch = to_device(collate([family.encode_sample(processor, sample, max_length)], pad_id), device, dtype)
                with autocast(device, dtype):
                    family.image_embeds(hf_model, batch)
                progress.update(task, advance=1, stats=f"{len(store.used)} images, {store.written} new")
    except BaseException:
        setattr(get_module(hf_model, parent) if parent else hf_model, child, tower)  # the model as it was
        raise
    finally:
        model.train(was_training)
    stand_in.drop_tower()
    del tower, frozen
    report = ImageCacheReport(
        folder=str(store.folder),
        images=len(store.used),
        computed=store.written,
        cache_mb=store.size_bytes(store.used) / 2**20,
        tower_mb=tower_bytes / 2**20,
        seconds=time.perf_counter() - start,
    )
    console.print(
        f"image features: {report.images} images ({report.computed} computed, {report.images - report.computed} cached) "
        f"in {report.seconds:.1f} s | {report.cache_mb:.1f} MB in {report.folder} | vision tower freed ({report.tower_mb:.0f} MB)"
    )
    return report


def frozen_part(tower: torch.nn.Module, call: ImageCacheCall) -> dict[str, torch.Tensor]:
    """The tower's parameters and buffers outside the children the stand-in keeps, by name."""
    kept = {id(t) for name in call.keep for t in [*getattr(tower, name).parameters(), *getattr(tower, name).buffers()]}
    tensors = {**dict(tower.named_parameters()), **dict(tower.named_buffers())}
    return {name: t for name, t in tensors.items() if id(t) not in kept}


def check_cacheable(call: ImageCacheCall, tower: torch.nn.Module, frozen: dict[str, torch.Tensor]) -> None:
    """UserError if the frozen part's outputs could change between epochs: a parameter of it trains,
    or it drops activations in training (the model trains in train mode)."""
    trained = [name for name, t in frozen.items() if t.requires_grad]
    if trained:
        more = f" and {len(trained) - 1} more" if len(trained) > 1 else ""
        raise UserError(
            f"{KEY}: the method trains vision tower parameters ({call.path}.{trained[0]}{more}), so the tower's "
            "outputs change every step and cannot be cached; set train.cache_image_features: false"
        )
    for name, module in tower.named_modules():
        if name.split(".")[0] in call.keep:
            continue
        rates = [module.p] if isinstance(module, torch.nn.Dropout) else []
        rates += [getattr(module, attr) for attr in ("dropout", "attention_dropout") if isinstance(getattr(module, attr, None), float)]
        if any(rate > 0 for rate in rates):
            raise UserError(
                f"{KEY}: the vision tower applies dropout in training ({call.path}.{name}, p={max(rates)}), so its "
                "outputs differ every epoch and cannot be cached; set train.cache_image_features: false"
            )


def model_folder(hf_model: Any, family: Any, tower: torch.nn.Module, call: ImageCacheCall,
                 frozen: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> Path:
    """The cache folder of this model's frozen tower; writes fingerprint.json there."""
    import transformers

    config = getattr(tower, "config", None)
    settings = {k: v for k, v in (config.to_dict() if config is not None else {}).items() if not k.startswith("_")}
    settings.pop("transformers_version", None)
    fingerprint = {
        "format": FORMAT,
        "family": family.name,
        "tower": f"{type(tower).__module__}.{type(tower).__qualname__}",
        "tower_config": settings,
        "attention": getattr(config, "_attn_implementation", None),
        "cached": call.describe(),
        "weights_sha256": hash_tensors(hashlib.sha256(), frozen).hexdigest(),
        "dtype": str(dtype).removeprefix("torch."),
        "device": device.type,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    name = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=repr).encode()).hexdigest()[:16]
    folder = cache_root() / name
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / "fingerprint.json"
    if not record.is_file():
        readable = {**fingerprint, "model": str(getattr(hf_model.config, "_name_or_path", ""))}
        with atomic_file(record) as scratch:
            scratch.write_text(json.dumps(readable, indent=2, sort_keys=True, default=repr))
    return folder


def hash_tensors(digest: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``digest`` updated with each tensor's name, dtype, shape and bytes, in name order."""
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest
