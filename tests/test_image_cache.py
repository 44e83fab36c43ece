"""train.cache_image_features (edgetune.image_cache): with the tower's outputs read from the cache,
training gives the plain path's losses for every family; a second run computes nothing; the key
follows the image and the processor settings; a tower that could change is refused."""

import gc
import json
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from edgetune import image_cache
from edgetune.data import load_samples
from edgetune.errors import UserError
from edgetune.families.base import get_module
from edgetune.load import load_backbone
from edgetune.methods import get_method
from edgetune.recipe import load_recipe
from edgetune.train import train
from tests.conftest import VARIANTS, make_recipe

# One method per family, so that every kind of method runs over the cache once: peft's (lora,
# ia3), hooks in the LLM (adapter, prefix), on the connector's output (adalink), and LLaMA-Adapter's
# visual prompt, which reads the connector's output (on both families that allow it).
CASES = [
    ("llava", "lora"),
    ("llava", "llama_adapter-visual"),
    ("llava_next", "ia3"),
    ("qwen2_vl", "lora"),
    ("qwen2_5_vl", "adapter"),
    ("idefics3", "prefix"),
    ("smolvlm", "adalink"),
    ("paligemma", "llama_adapter-visual"),
]


@pytest.fixture(scope="module")
def small_task(tmp_path_factory):
    """8 training and 4 held-out samples: 3 steps of 4 see each training image more than once."""
    from edgetune.builtin_task import write_task

    out = tmp_path_factory.mktemp("small-task")
    write_task(out / "data", train_count=8, eval_count=4)
    return out


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGETUNE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "image-features"


@pytest.fixture
def installs(monkeypatch):
    """Each cache_image_features call train() makes: (report, stand-in, whether the real tower was
    freed right after)."""
    seen = []
    real = image_cache.cache_image_features

    def spy(model, backbone, *args):
        hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
        path = backbone.family.image_cache_call(hf_model).path
        tower = weakref.ref(get_module(hf_model, path))
        report = real(model, backbone, *args)
        gc.collect()
        seen.append((report, get_module(hf_model, path), tower() is None))
        return report

    monkeypatch.setattr(image_cache, "cache_image_features", spy)
    return seen


def metrics(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r], [r["eval_loss"] for r in records if "eval_loss" in r]


@pytest.mark.parametrize("family,variant", CASES)
def test_cached_features_give_the_plain_losses_and_a_second_run_computes_none(
    family, variant, tiny_model_dir, small_task, tmp_path, cache_dir, installs
):
    def run(name, cache):
        recipe = load_recipe(make_recipe(
            tmp_path / f"{name}.yaml", tiny_model_dir(family), small_task, method=VARIANTS[variant],
            train={"max_steps": 3, "batch_size": 4, "eval_every": 3, "eval_samples": 4, "cache_image_features": cache},
        ))
        train(recipe, tmp_path / name)
        return metrics(tmp_path / name)

    plain, cached, again = run("plain", False), run("cached", True), run("again", True)
    for losses in (cached, again):
        assert losses[0] == pytest.approx(plain[0], rel=1e-5, abs=1e-6)
        assert losses[1] == pytest.approx(plain[1], rel=1e-5, abs=1e-6) and len(losses[1]) == 1
    (first, stand_in, freed), (second, stand_in_again, freed_again) = installs
    assert isinstance(stand_in, image_cache.CachedVisionTower) and stand_in.tower is None
    assert freed and freed_again  # the real tower's weights left memory
    assert first.computed == first.images > 0 and first.cache_mb > 0 and first.tower_mb > 0
    assert second.computed == 0 and second.images == first.images and stand_in_again.tower_runs == 0
    entries = list(cache_dir.glob("*/*/*.safetensors"))
    assert len(entries) == first.images
    with safe_open(str(entries[0]), "pt") as entry:
        assert set(entry.keys()) == set(getattr(stand_in.call, "fields", ("merger_input",)))
        assert entry.metadata() == {"format": image_cache.FORMAT}
    assert json.loads((Path(first.folder) / "fingerprint.json").read_text())["family"] == family
    assert Path(first.folder).parent == cache_dir


def cached_keys(model_dir, task, tmp_path, samples, processor=None):
    """The keys the images of ``samples`` get, and the report, with model.processor = ``processor``."""
    recipe = load_recipe(make_recipe(tmp_path / "recipe.yaml", model_dir, task, model={"processor": processor or {}}))
    backbone = load_backbone(recipe.model, recipe.quantization, torch.device("cpu"), torch.float32)
    model = get_method(recipe.method).attach(backbone.model, backbone.family, recipe.method)
    report = image_cache.cache_image_features(model, backbone, samples, 128, torch.device("cpu"), torch.float32)
    stand_in = get_module(model.get_base_model(), backbone.family.vision_tower)
    return set(stand_in.store.used), report


def test_the_key_follows_the_image_and_the_processor_settings(tiny_model_dir, small_task, tmp_path, cache_dir):
    model_dir = tiny_model_dir("qwen2_vl")
    samples = load_samples(small_task / "data/train.json")
    assert samples[0].images[0].read_bytes() != samples[1].images[0].read_bytes()
    first, report = cached_keys(model_dir, small_task, tmp_path, samples[:1])
    same, same_report = cached_keys(model_dir, small_task, tmp_path, samples[:1])
    assert len(first) == 1 and same == first and report.computed == 1 and same_report.computed == 0
    other_image, _ = cached_keys(model_dir, small_task, tmp_path, samples[1:2])
    smaller, _ = cached_keys(model_dir, small_task, tmp_path, samples[:1], processor={"max_pixels": 32 * 32})
    assert other_image.isdisjoint(first) and smaller.isdisjoint(first) and len(smaller) == 1
    (folder,) = cache_dir.iterdir()  # one model: one folder, every entry in it
    assert len(list(folder.glob("*/*.safetensors"))) == 3


def test_llava_caches_only_the_feature_layer(tiny_model_dir, small_task, tmp_path, cache_dir):
    samples = load_samples(small_task / "data/train.json")[:2]
    keys, report = cached_keys(tiny_model_dir("llava"), small_task, tmp_path, samples)
    assert report.images == len(keys) == 2
    (entry,) = cache_dir.glob(f"*/*/{min(keys)}.safetensors")
    with safe_open(str(entry), "pt") as tensors:
        assert list(tensors.keys()) == ["hidden_states.1"]  # vision_feature_layer -2 of 3 hidden states
        assert tuple(tensors.get_tensor("hidden_states.1").shape) == (17, 32)  # CLS + 4x4 patches, tower width


@pytest.mark.parametrize("change", ["trainable", "dropout"])
def test_a_tower_whose_outputs_can_change_is_refused(change, tiny_model_dir, small_task, tmp_path, cache_dir):
    recipe = load_recipe(make_recipe(tmp_path / "recipe.yaml", tiny_model_dir("llava"), small_task))
    backbone = load_backbone(recipe.model, recipe.quantization, torch.device("cpu"), torch.float32)
    model = get_method(recipe.method).attach(backbone.model, backbone.family, recipe.method)
    tower = get_module(model.get_base_model(), backbone.family.vision_tower)
    if change == "trainable":
        tower.vision_model.encoder.layers[1].mlp.fc1.weight.requires_grad_(True)
        expected = r"train.cache_image_features: the method trains vision tower parameters \(model.vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight\)"
    else:
        tower.vision_model.encoder.layers[0].self_attn.dropout = 0.1
        expected = r"train.cache_image_features: the vision tower applies dropout in training"
    samples = load_samples(recipe.data.train)[:1]
    with pytest.raises(UserError, match=expected):
        image_cache.cache_image_features(model, backbone, samples, 128, torch.device("cpu"), torch.float32)
    assert get_module(model.get_base_model(), backbone.family.vision_tower) is tower and not cache_dir.exists()


def test_the_cache_lives_where_the_environment_says(monkeypatch, tmp_path):
    monkeypatch.delenv("EDGETUNE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert image_cache.cache_root() == tmp_path / "xdg/edgetune/image-features"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert image_cache.cache_root() == tmp_path / "home/.cache/edgetune/image-features"
    monkeypatch.setenv("EDGETUNE_CACHE_DIR", str(tmp_path / "mine"))
    assert image_cache.cache_root() == tmp_path / "mine/image-features"
