import json

import pytest
import torch

from edgetune.errors import UserError
from edgetune.load import load_backbone
from edgetune.methods import get_method
from edgetune.recipe import load_recipe
from edgetune.train import EncodedDataset, held_out_loss, to_device, train
from edgetune.data import collate, load_samples
from tests.conftest import make_recipe


@pytest.fixture(scope="module")
def trained(tiny_llava_dir, task_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    recipe = load_recipe(make_recipe(root / "recipe.yaml", tiny_llava_dir, task_dir,
                                     method={"rank": 8, "alpha": 16},
                                     train={"max_steps": 40, "batch_size": 8, "warmup_steps": 2, "eval_every": 20}))
    return recipe, train(recipe, root / "run"), root / "run"


def test_a_few_steps_lower_train_and_held_out_loss(trained):
    _, result, run_dir = trained
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert result.final_loss < 0.5 * result.first_loss
    assert len(evals) == 2 and evals[-1] < 0.5 * result.first_loss


def test_run_directory_holds_a_reloadable_peft_adapter(trained):
    recipe, result, run_dir = trained
    from peft import PeftConfig

    assert {p.name for p in run_dir.iterdir()} >= {"adapter", "recipe.yaml", "metrics.jsonl", "loss.png", "run.json"}
    assert (run_dir / "adapter/adapter_model.safetensors").is_file()
    config = PeftConfig.from_pretrained(run_dir / "adapter")
    assert config.peft_type == "LORA" and config.r == 8
    assert load_recipe(run_dir / "recipe.yaml") == recipe
    assert json.loads((run_dir / "run.json").read_text())["trainable_params"] == result.trainable_params


def test_lora_sits_in_the_llm_only_and_the_connector_trains(tiny_llava_dir, write_recipe):
    recipe = load_recipe(write_recipe())
    backbone = load_backbone(recipe.model, recipe.quantization, torch.device("cpu"), torch.float32)
    model = get_method(recipe.method).attach(backbone.model, backbone.family, recipe.method)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    lora = [n for n in trainable if "lora_" in n]
    assert lora and all(".language_model.layers." in n for n in lora)
    assert not any("vision_tower" in n for n in trainable)
    assert all("lora_" in n or "multi_modal_projector" in n for n in trainable)
    assert any("multi_modal_projector" in n for n in trainable)
    frozen_connector = load_recipe(write_recipe(method={"train_connector": False, "placement": "attn"}))
    backbone = load_backbone(recipe.model, recipe.quantization, torch.device("cpu"), torch.float32)
    model = get_method(frozen_connector.method).attach(backbone.model, backbone.family, frozen_connector.method)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n and "self_attn" in n for n in names)


def test_same_seed_same_losses_on_cpu(write_recipe, tmp_path):
    recipe = load_recipe(write_recipe(train={"max_steps": 4, "seed": 7}))
    losses = []
    for name in ("a", "b"):
        train(recipe, tmp_path / name)
        losses.append([json.loads(l)["loss"] for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()])
    assert losses[0] == losses[1]


def test_gradients_are_the_same_after_a_no_grad_evaluation(write_recipe):
    """bitsandbytes repacks NF4 weights for an inference-only CPU kernel after one no-grad eval
    pass on AVX512-BF16 CPUs; edgetune turns that off so training gradients stay right."""
    recipe = load_recipe(write_recipe())
    backbone = load_backbone(recipe.model, recipe.quantization, torch.device("cpu"), torch.float32)
    model = get_method(recipe.method).attach(backbone.model, backbone.family, recipe.method)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)  # non-zero B so that gradients reach lora_A
    samples = load_samples(recipe.data.train)[:4]
    dataset = EncodedDataset(samples, backbone.processor, backbone.family, 128)
    pad = backbone.processor.tokenizer.pad_token_id
    batch = to_device(collate([dataset[i] for i in range(4)], pad), torch.device("cpu"), torch.float32)
    first_layer_a = next(p for n, p in model.named_parameters() if "layers.0.self_attn.q_proj.lora_A" in n)

    def grad():
        model.zero_grad()
        model.train()
        model(**batch).loss.backward()
        return first_layer_a.grad.clone()

    before = grad()
    held_out_loss(model, dataset, pad, 4, 4, torch.device("cpu"), torch.float32)
    after = grad()
    assert before.abs().sum() > 0
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-7)


def test_a_failed_run_leaves_no_directory(write_recipe, tmp_path):
    recipe = load_recipe(write_recipe(data={"max_length": 8}))
    with pytest.raises(UserError, match=r"exceed data\.max_length=8"):
        train(recipe, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.partial")]



@pytest.mark.parametrize("method", [{"name": m} for m in ("lora", "adapter", "ia3", "prefix", "adalink")]
                         + [{"name": "llama_adapter", "visual_prompt": True}], ids=lambda m: m["name"])
def test_a_bf16_backbone_trains_every_method(method, write_recipe, tmp_path):
    """A bf16 backbone with fp32 trainable weights (what CUDA users get) needs autocast: without it
    the first fp32 layer fed bf16 activations fails. CPU runs the same autocast path."""
    recipe = load_recipe(write_recipe(method=method, train={"max_steps": 4, "precision": "bf16", "eval_every": 2}))
    result = train(recipe, tmp_path / "run")
    losses = torch.tensor([result.first_loss, result.final_loss, result.eval_loss])
    assert torch.isfinite(losses).all(), losses
    assert json.loads((tmp_path / "run/run.json").read_text())["method"] == method["name"]
