"""The training loss as the loop computes it: logits only at the answer tokens, the same loss and
gradient as transformers' plain full-logits path for every family and method; one optimizer step's
loss normalised over all answer tokens of its micro-batches; the frozen vision tower keeps no
activations for backward; worker processes do not change the batches."""

from __future__ import annotations

import json

import pytest
import torch

from edgetune.data import collate, load_samples
from edgetune.families.base import get_module
from edgetune.load import load_backbone
from edgetune.methods import get_method
from edgetune.recipe import load_recipe
from edgetune.train import EncodedDataset, accumulate_gradients, answer_token_loss, to_device, train
from tests.conftest import make_recipe
from tests.test_methods import SUPPORTED, recipe_for

CPU = torch.device("cpu")


def attached_with_moved_weights(recipe):
    """The backbone with the method attached and every trainable tensor moved off its init, so that
    gradients reach every trainable parameter (LoRA's B starts at zero)."""
    backbone = load_backbone(recipe.model, recipe.quantization, CPU, torch.float32)
    model = get_method(recipe.method).attach(backbone.model, backbone.family, recipe.method)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float() + torch.randn_like(param, dtype=torch.float32) * 0.05
    model.train()
    return backbone, model


def labelled_batch(recipe, backbone, samples):
    dataset = EncodedDataset(samples, backbone.processor, backbone.family, recipe.data.max_length)
    return collate([dataset[i] for i in range(len(samples))], backbone.processor.tokenizer.pad_token_id)


def gradients(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize(("family", "name"), SUPPORTED)
def test_answer_token_logits_give_the_plain_loss_and_gradient(family, name, tmp_path, tiny_model_dir, task_dir):
    recipe = recipe_for(family, name, tmp_path, tiny_model_dir, task_dir)
    backbone, model = attached_with_moved_weights(recipe)
    batch = to_device(labelled_batch(recipe, backbone, load_samples(recipe.data.train)[:4]), CPU, torch.float32)

    plain = model(**batch).loss  # transformers' ForCausalLMLoss over the full [batch, seq, vocab] logits
    plain.backward()
    expected = gradients(model)
    model.zero_grad(set_to_none=True)

    seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))
    loss_sum, tokens = answer_token_loss(model, backbone.family, batch)
    handle.remove()
    (loss_sum / tokens).backward()
    got = gradients(model)

    assert tokens == int((batch["labels"][:, 1:] != -100).sum()) > 0
    assert seen == [(1, tokens, backbone.model.config.get_text_config().vocab_size)], "the LM head ran on more than the answer tokens"
    torch.testing.assert_close(loss_sum / tokens, plain, rtol=1e-5, atol=1e-6)
    assert expected.keys() == got.keys() and expected
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)


def write_uneven_answers(task_dir, out):
    """8 samples whose answers are 1 to 8 words long: per-micro-batch means then weigh tokens unequally."""
    entries = json.loads((task_dir / "data/train.json").read_text())[:8]
    for i, entry in enumerate(entries):
        entry["image"] = str((task_dir / "data" / entry["image"]).resolve())
        entry["conversations"][1]["value"] = " ".join(["red"] * (1 + i))
    out.write_text(json.dumps(entries))
    return out


def test_gradient_accumulation_normalises_over_all_answer_tokens(tmp_path, tiny_llava_dir, task_dir):
    """batch_size 8 x grad_accum 1 and batch_size 2 x grad_accum 4 on the same data: the same loss
    and gradient. The mean of per-micro-batch means (what dividing each micro-batch's mean loss by
    grad_accum gives) differs on these answers of different lengths, so the check can fail."""
    data = write_uneven_answers(task_dir, tmp_path / "uneven.json")
    recipe = load_recipe(make_recipe(tmp_path / "r.yaml", tiny_llava_dir, task_dir, data={"train": str(data)}))
    backbone, model = attached_with_moved_weights(recipe)
    samples = load_samples(data)

    whole = accumulate_gradients(model, backbone.family, [labelled_batch(recipe, backbone, samples)], CPU, torch.float32)
    expected = gradients(model)
    model.zero_grad(set_to_none=True)
    micro = [labelled_batch(recipe, backbone, samples[i:i + 2]) for i in range(0, 8, 2)]
    accumulated = accumulate_gradients(model, backbone.family, micro, CPU, torch.float32)
    got = gradients(model)
    model.zero_grad(set_to_none=True)
    for batch in micro:  # the old normalisation, for contrast
        loss_sum, tokens = answer_token_loss(model, backbone.family, to_device(batch, CPU, torch.float32))
        (loss_sum / tokens / len(micro)).backward()
    mean_of_means = gradients(model)

    assert accumulated == pytest.approx(whole, rel=1e-5)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-7, msg=key)
    key = next(k for k in expected if "lora_A" in k)
    assert (mean_of_means[key] - expected[key]).abs().max() > 100 * (got[key] - expected[key]).abs().max()


@pytest.mark.parametrize("family", ["idefics3", "llava", "llava_next", "paligemma", "qwen2_vl"])
def test_the_frozen_vision_tower_keeps_no_activations(family, tmp_path, tiny_model_dir, task_dir):
    """In a training forward the frozen tower builds no autograd graph (nothing saved for backward);
    the gradient starts at the trained connector."""
    recipe = recipe_for(family, "lora", tmp_path, tiny_model_dir, task_dir)
    backbone, model = attached_with_moved_weights(recipe)
    chosen = backbone.family
    tower, connector = get_module(backbone.model, chosen.vision_tower), get_module(backbone.model, chosen.connector)
    outputs = {}
    watched = [tower, connector] if not any(connector is m for m in tower.modules()) else [connector]
    # Qwen2-VL's tower holds its merger (the connector): the frozen part's output is the merger's input.
    def keep(key):
        def hook(module, args, output):
            outputs.setdefault(key, (args, output))  # the first call: a hook that returns None changes nothing

        return hook

    handles = [m.register_forward_hook(keep(i)) for i, m in enumerate(watched)]
    batch = to_device(labelled_batch(recipe, backbone, load_samples(recipe.data.train)[:2]), CPU, torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss_sum, _ = answer_token_loss(model, backbone.family, batch)
    for handle in handles:
        handle.remove()
    connector_input, connector_output = outputs[len(watched) - 1]
    frozen_output = connector_input[0]
    assert not frozen_output.requires_grad and frozen_output.grad_fn is None
    assert connector_output.requires_grad and saved
    loss_sum.backward()
    assert all(p.grad is None for p in tower.parameters() if not any(p is q for q in connector.parameters()))


def test_worker_processes_give_the_same_losses(write_recipe, tmp_path):
    losses = []
    for workers in (0, 2):
        recipe = load_recipe(write_recipe(train={"max_steps": 4, "seed": 3, "num_workers": workers}))
        train(recipe, tmp_path / f"w{workers}")
        losses.append([json.loads(line)["loss"] for line in (tmp_path / f"w{workers}/metrics.jsonl").read_text().splitlines()])
    assert losses[0] == losses[1]
