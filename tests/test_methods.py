"""One matrix over every registered family x every registered method (peft's lesson): the same
tiny models, the same checks.

For each pair (and LLaMA-Adapter's multimodal variant on LLaVA): the model at step 0 equals the
frozen model (zero-init methods), save -> load reproduces the outputs, a few steps lower the
loss, the merge reloads to the adapted model, and the exported bundle matches PyTorch within the
fp32 tolerance (the parity check includes two images of different sizes, so dynamic-resolution
families export with different image-token counts) and gives the same greedy tokens, also with
torch blocked. A pair a method refuses (LLaMA-Adapter on M-RoPE) must be refused before any work.
"""

from __future__ import annotations

import pytest
import torch

from edgetune.data import collate, load_samples
from edgetune.errors import UserError
from edgetune.export.fusions import ATTENTION_FUSIONS
from edgetune.families import FAMILIES
from edgetune.load import load_backbone
from edgetune.methods import get_method
from edgetune.recipe import MethodSection, load_recipe
from edgetune.train import EncodedDataset, train
from tests.conftest import TORCH_BLOCKER, VARIANTS, make_recipe

CPU = torch.device("cpu")


def refusal(family, variant):
    """The method's UserError for this family, or None when the pair is supported."""
    try:
        config = MethodSection(**VARIANTS[variant])
        get_method(config).check_family(FAMILIES[family], config)
    except UserError as err:
        return str(err)
    return None


PAIRS = [(f, v) for f in sorted(FAMILIES) for v in VARIANTS]
# Under pytest-xdist (--dist loadgroup) every test of one pair runs on the same worker, so each
# pair's module-scoped train -> merge -> export fixture is built once.
SUPPORTED_PAIRS = [(f, v) for f, v in PAIRS if refusal(f, v) is None]
SUPPORTED = [pytest.param(f, v, id=f"{f}-{v}", marks=pytest.mark.xdist_group(f"{f}-{v}")) for f, v in SUPPORTED_PAIRS]
REFUSED = [pytest.param(f, v, id=f"{f}-{v}") for f, v in PAIRS if refusal(f, v) is not None]


def recipe_for(family, name, tmp_path, tiny_model_dir, task_dir, **train):
    return load_recipe(make_recipe(tmp_path / f"{family}-{name}.yaml", tiny_model_dir(family), task_dir,
                                   method=VARIANTS[name], train={"max_steps": 30, "lr": 3e-3, "batch_size": 8, **train}))


def probe(recipe, backbone, count=4):
    samples = load_samples(recipe.data.eval)[:count]
    dataset = EncodedDataset(samples, backbone.processor, backbone.family, recipe.data.max_length)
    batch = collate([dataset[i] for i in range(len(samples))], backbone.processor.tokenizer.pad_token_id)
    batch.pop("labels")
    return batch


def attached(recipe):
    backbone = load_backbone(recipe.model, recipe.quantization, CPU, torch.float32)
    method = get_method(recipe.method)
    return backbone, method, method.attach(backbone.model, backbone.family, recipe.method)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_nf4_quantizes_the_llm_only(family, tmp_path, tiny_model_dir, task_dir):
    """The vision tower and the connector stay in full precision; the LLM's linears are NF4."""
    import bitsandbytes as bnb

    from edgetune.families.base import get_module

    recipe = recipe_for(family, "lora", tmp_path, tiny_model_dir, task_dir)
    backbone = load_backbone(recipe.model, recipe.quantization, CPU, torch.float32)
    chosen = FAMILIES[family]
    for part in (chosen.vision_tower, chosen.connector):
        quantized = [n for n, m in get_module(backbone.model, part).named_modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert not quantized, f"{family}: {part} has 4-bit layers {quantized[:3]}"
    layers = get_module(backbone.model, chosen.layers)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in layers.modules()), family


@pytest.mark.parametrize(("family", "name"), REFUSED)
def test_unsupported_pairs_are_refused_before_loading(family, name, tmp_path, tiny_model_dir, task_dir):
    recipe = recipe_for(family, name, tmp_path, tiny_model_dir, task_dir)
    with pytest.raises(UserError) as refused:
        train(recipe, tmp_path / "run")
    assert str(refused.value) == refusal(family, name) and f"'{family}'" in str(refused.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("family", "name"), SUPPORTED)
def test_step_zero_equals_the_frozen_model(family, name, tmp_path, tiny_model_dir, task_dir):
    recipe = recipe_for(family, name, tmp_path, tiny_model_dir, task_dir)
    if not get_method(recipe.method).identity_at_init:
        pytest.skip(f"{name} is not zero-initialised (by design)")
    frozen = load_backbone(recipe.model, recipe.quantization, CPU, torch.float32)
    batch = probe(recipe, frozen)
    with torch.no_grad():
        expected = frozen.model(**batch).logits
    _, _, model = attached(recipe)
    model.eval()
    with torch.no_grad():
        got = model(**batch).logits
    assert float((got - expected).abs().max()) < 1e-5
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any("vision_tower" in n for n in trainable)


@pytest.mark.parametrize(("family", "name"), SUPPORTED)
def test_save_then_load_reproduces_outputs(family, name, tmp_path, tiny_model_dir, task_dir):
    recipe = recipe_for(family, name, tmp_path, tiny_model_dir, task_dir)
    backbone, method, model = attached(recipe)
    torch.manual_seed(0)
    with torch.no_grad():  # move every trainable tensor off its init so that the check means something
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    model.eval()
    batch = probe(recipe, backbone)
    with torch.no_grad():
        expected = model(**batch).logits
    method.save(model, tmp_path / "artifact")
    fresh = load_backbone(recipe.model, recipe.quantization, CPU, torch.float32)
    reloaded = method.load(fresh.model, fresh.family, recipe.method, tmp_path / "artifact").eval()
    with torch.no_grad():
        got = reloaded(**batch).logits
    assert float((got - expected).abs().max()) < 1e-5


@pytest.fixture(params=[
    pytest.param((f, v), id=f"{f}-{v}", marks=pytest.mark.xdist_group(f"{f}-{v}")) for f, v in SUPPORTED_PAIRS
])
def trained_and_exported(request, pipeline):
    family, name = request.param
    return f"{family}-{name}", *pipeline(family, name)


def test_a_few_steps_lower_the_loss(trained_and_exported):
    """30 steps: LoRA, the adapters and AdaLink reach about half the first loss on every family; the
    slowest pairs are PaliGemma's small methods (its tiny vocabulary adds 1152 location/segmentation
    tokens, so it starts higher): IA3 0.75, LLaMA-Adapter 0.78, prefix 0.82 of the first loss."""
    name, _, result, *_ = trained_and_exported
    assert result.final_loss < 0.85 * result.first_loss, name


def test_merge_then_export_matches_pytorch(trained_and_exported):
    name, _, _, merge, manifest, _ = trained_and_exported
    assert merge.max_logit_diff < 1e-4, name
    worst = max(check["max_abs_diff"] for check in manifest["parity"]["checks"])
    assert worst < 1e-4, f"{name}: {worst}"


def test_bundle_declares_the_runtime_features_it_needs(trained_and_exported):
    """A format-1 runtime would silently run a prefix bundle without its prefix: such bundles say 2."""
    name, _, _, _, manifest, root = trained_and_exported
    family, method = name.split("-", 1)
    fused = bool(ATTENTION_FUSIONS & set(manifest["decoder_fusions"]))
    assert fused == (family != "paligemma" and method != "prefix"), name  # fused wherever it matches PyTorch
    assert ("padded_rows" in manifest["text"]) == fused, name
    if fused:
        assert manifest["format_version"] == 4, name  # a format-3 runtime would feed it left-padded rows
    elif manifest["image"]["codec"] != "clip":
        assert manifest["format_version"] == 3, name  # a format-2 runtime only knows CLIP images
    else:
        needs_new_runtime = method in ("prefix", "llama_adapter-visual")
        assert manifest["format_version"] == (2 if needs_new_runtime else 1), name
    assert ("kv_prefix" in manifest) == (method == "prefix")
    assert (root / "bundle/kv_prefix.safetensors").is_file() == (method == "prefix")


def test_runtime_greedy_tokens_equal_pytorch(trained_and_exported):
    from edgetune.data import open_image
    from edgetune.merge import load_merged
    from edgetune.runtime import OnnxVLM

    name, recipe, _, _, _, root = trained_and_exported
    merged = load_merged(root / "merged")
    vlm = OnnxVLM.load(root / "bundle")
    tokenizer = merged.processor.tokenizer
    for sample in load_samples(recipe.data.eval)[:3]:
        inputs = merged.family.prompt_inputs(merged.processor, [sample.question], [[open_image(sample.images[0])]])
        with torch.no_grad():
            out = merged.model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        expected = out[0, inputs["input_ids"].shape[1]:].tolist()
        assert vlm.generate_ids(sample.images[0], sample.question, max_new_tokens=8) == expected, name


TORCH_BLOCKED = TORCH_BLOCKER + """
import json
from edgetune.runtime import OnnxVLM
print(json.dumps(OnnxVLM.load(sys.argv[1]).generate_ids(sys.argv[2], sys.argv[3], max_new_tokens=8)))
"""


@pytest.mark.parametrize("trained_and_exported", [
    pytest.param(("llava", v), id=f"llava-{v}", marks=pytest.mark.xdist_group(f"llava-{v}")) for f, v in SUPPORTED_PAIRS if f == "llava"
], indirect=True)
def test_bundle_runs_with_torch_blocked(trained_and_exported):
    """Each method's bundle shape (plain, traced modules, image_feature input, KV prefix) on the
    device side: same tokens with torch and transformers unimportable. On LLaVA; every family's
    own codec is checked the same way in its tests/test_family_*.py."""
    import json
    import subprocess
    import sys

    from edgetune.runtime import OnnxVLM

    name, recipe, _, _, _, root = trained_and_exported
    sample = load_samples(recipe.data.eval)[0]
    args = [str(root / "bundle"), str(sample.images[0]), sample.question]
    result = subprocess.run([sys.executable, "-c", TORCH_BLOCKED, *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    expected = OnnxVLM.load(root / "bundle").generate_ids(sample.images[0], sample.question, max_new_tokens=8)
    assert json.loads(result.stdout) == expected, name
