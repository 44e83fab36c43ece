"""``edgetune plan``: every shipped recipe plans offline against the tiny models' configs and names
every memory part; the predicted numbers move the right way when a knob turns; the weight parts
equal the tensors of the model training loads; bad input is one line and exit code 2."""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from edgetune import plan as plan_module
from edgetune.cli import app
from edgetune.plan import PART_LABELS, plan_recipe
from edgetune.recipe import recipe_from_dict

ONE_GPU_PARTS = {k: v for k, v in PART_LABELS.items() if k != "ddp_buckets"}  # that one only with --gpus N

runner = CliRunner()
RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
# The family of every checkpoint the shipped recipes name: a new recipe's checkpoint goes here.
FAMILY_OF_CHECKPOINT = {
    "llava-hf/llava-1.5-7b-hf": "llava",
    "llava-hf/llava-v1.6-mistral-7b-hf": "llava_next",
    "Qwen/Qwen2-VL-2B-Instruct": "qwen2_vl",
    "Qwen/Qwen2.5-VL-3B-Instruct": "qwen2_5_vl",
    "HuggingFaceM4/Idefics3-8B-Llama3": "idefics3",
    "HuggingFaceTB/SmolVLM-256M-Instruct": "idefics3",
    "HuggingFaceTB/SmolVLM-500M-Instruct": "idefics3",
    "HuggingFaceTB/SmolVLM2-500M-Video-Instruct": "smolvlm",
    "google/paligemma-3b-pt-224": "paligemma",
    "google/paligemma-3b-pt-448": "paligemma",
}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test here may reach the hub."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("the hub was asked"))


def run(*args):
    return runner.invoke(app, ["plan", *[str(a) for a in args]])


def assert_one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def data_overrides(task_dir):
    return ["--set", f"data.train={task_dir / 'data/train.json'}", "--set", f"data.eval={task_dir / 'data/eval.json'}"]


def tiny_plan(tiny_model_dir, task_dir, family="llava", target=None, **sections):
    """plan_recipe on a tiny model of ``family`` and the tiny task, with per-test recipe sections,
    for ``target`` (plan_recipe's keywords; default: --gpu rtx-4090)."""
    raw = {
        "model": {"path": str(tiny_model_dir(family))},
        "method": {"name": "lora", "rank": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(task_dir / "data/train.json"), "max_length": 256},
        "train": {"max_steps": 100, "batch_size": 2, "grad_accum": 2},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return plan_recipe(recipe_from_dict(raw, "test.yaml", task_dir), "test", **({"gpu": "rtx-4090"} if target is None else target))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_recipe_plans_offline_and_names_every_part(recipe, tiny_model_dir, task_dir):
    family = FAMILY_OF_CHECKPOINT[yaml.safe_load(recipe.read_text())["model"]["path"]]
    result = run(recipe, "--set", f"model.path={tiny_model_dir(family)}", *data_overrides(task_dir), "--gpu", "rtx-4090")
    assert result.exit_code == 0, result.output
    for label in [*ONE_GPU_PARTS.values(), "peak", "budget", "fits", "image tokens per sample", "sequence length",
                  "tokens per step", "time per step", "steps"]:
        assert label in result.output, (label, result.output)
    assert f"{family}," in result.output  # the title names the family read from config.json


def test_json_has_the_contract_keys(tiny_llava_dir, task_dir, write_recipe):
    result = run(write_recipe(), "--gpu", "rtx-3060-12gb", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    for key in ("peak_memory_mb", "step_seconds", "run_seconds", "image_tokens_per_sample", "fits", "parts"):
        assert key in out, key
    assert set(out["parts"]) == set(ONE_GPU_PARTS)
    assert out["budget_mb"] == 12 * 1024 and out["fits"] is True and out["dtype"] == "bf16"
    assert out["image_tokens_per_sample"] == 16  # tiny LLaVA: a 32 px crop of 8 px patches
    assert out["run_seconds"] == pytest.approx(out["step_seconds"] * 8)  # conftest's recipe: 8 steps
    parts = out["parts"]
    transient = max(parts["vision_activations"], parts["activations"] + parts["logits"])
    static = sum(v for k, v in parts.items() if k not in ("vision_activations", "activations", "logits", "overhead"))
    assert out["allocated_mb"] == pytest.approx(static + transient, abs=0.01)
    assert out["peak_memory_mb"] == pytest.approx(out["allocated_mb"] + parts["overhead"], abs=0.1)


def test_memory_responds_to_each_knob(tiny_model_dir, task_dir):
    base = tiny_plan(tiny_model_dir, task_dir).prediction.parts_mb
    doubled = tiny_plan(tiny_model_dir, task_dir, train={"batch_size": 4}).prediction.parts_mb
    assert doubled["activations"] > base["activations"] and doubled["logits"] == pytest.approx(2 * base["logits"])
    assert doubled["quantized_weights"] == base["quantized_weights"] and doubled["trainable_params"] == base["trainable_params"]

    unchecked = tiny_plan(tiny_model_dir, task_dir, train={"gradient_checkpointing": False}).prediction.parts_mb
    assert unchecked["activations"] > base["activations"]

    cached = tiny_plan(tiny_model_dir, task_dir, train={"cache_image_features": True}).prediction.parts_mb
    assert base["vision_tower"] > 0 and cached["vision_tower"] == 0 and cached["vision_activations"] == 0
    assert cached["precise_weights"] == base["precise_weights"]

    # rank 64: LoRA's matrices reach bitsandbytes' 4096 elements, under which it keeps 32-bit state
    adamw = tiny_plan(tiny_model_dir, task_dir, method={"rank": 64}).prediction.parts_mb["optimizer_state"]
    paged = tiny_plan(tiny_model_dir, task_dir, method={"rank": 64}, train={"optimizer": "paged_adamw_8bit"})
    assert paged.prediction.parts_mb["optimizer_state"] < adamw / 2


def test_image_settings_go_through_the_familys_processor(tiny_model_dir, task_dir):
    """Tiny Qwen2-VL: a 48 px image is 6 x 6 patches of 8 px, merged 2 x 2 into 9 tokens; at most
    32 x 32 pixels it is 2 x 2 merged tokens (as the processor resizes it), and memory follows."""
    full = tiny_plan(tiny_model_dir, task_dir, family="qwen2_vl")
    small = tiny_plan(tiny_model_dir, task_dir, family="qwen2_vl", model={"processor": {"max_pixels": 32 * 32}})
    assert full.image_tokens_per_sample == 9 and small.image_tokens_per_sample == 4
    assert small.prediction.parts_mb["activations"] < full.prediction.parts_mb["activations"]
    assert small.prediction.seq_max == full.prediction.seq_max - 5


def test_weight_parts_equal_the_loaded_models_tensors(tiny_model_dir, task_dir):
    """Tiny Qwen2-VL (tied embeddings, connector inside the vision tower) loaded in NF4 on CPU as
    training loads it: the predicted weight and trainable parts are its tensors' bytes."""
    import torch

    from edgetune.load import count_parameters, load_backbone
    from edgetune.methods import get_method

    planned = tiny_plan(tiny_model_dir, task_dir, family="qwen2_vl", target={"device": "cpu", "cpu_tflops": 0.1})
    recipe = planned.recipe
    backbone = load_backbone(recipe.model, recipe.quantization, torch.device("cpu"), torch.float32)
    model = get_method(recipe.method).attach(backbone.model, backbone.family, recipe.method)
    trainable, _ = count_parameters(model)
    assert planned.shape.trainable_params == trainable

    measured = {"quantized": 0, "other_frozen": 0}
    for param in model.parameters():
        if param.__class__.__name__ == "Params4bit":
            state = param.quant_state
            measured["quantized"] += param.numel() + state.absmax.numel() + 4 * state.state2.absmax.numel()
        elif not param.requires_grad:
            measured["other_frozen"] += param.numel() * param.element_size()
    parts = {k: v * 2**20 for k, v in planned.prediction.parts_mb.items()}
    assert parts["quantized_weights"] == pytest.approx(measured["quantized"], rel=0.01)
    assert parts["precise_weights"] + parts["vision_tower"] == pytest.approx(measured["other_frozen"])
    assert parts["trainable_params"] == 4 * trainable


def test_cpu_plans_for_this_machine_with_the_probe_behind_a_function(tiny_model_dir, task_dir, monkeypatch):
    monkeypatch.setattr(plan_module, "measure_cpu_tflops", lambda dtype="fp32", seconds=0.3: 0.05)
    monkeypatch.setattr(plan_module, "available_memory_mb", lambda: 1000.0)
    planned = tiny_plan(tiny_model_dir, task_dir, train={"device": "cpu"}, target={})
    target, prediction = planned.target, planned.prediction
    assert (target.device, target.dtype, target.tflops, target.budget_mb) == ("cpu", "fp32", 0.05, 1000.0)
    assert prediction.step_seconds == pytest.approx(prediction.flops_per_step / (0.05e12 * plan_module.CPU_EFFICIENCY))
    assert prediction.parts_mb["overhead"] > plan_module.CPU_PROCESS_MB  # the process itself, as RssAnon counts it
    assert planned.to_json()["run_seconds"] == pytest.approx(100 * prediction.step_seconds)


def test_a_plan_that_does_not_fit_names_knobs_with_their_savings(tiny_model_dir, task_dir, write_recipe):
    result = run(write_recipe(train={"batch_size": 8, "gradient_checkpointing": False}), "--vram", "0.25", "--json")
    out = json.loads(result.stdout)
    assert out["fits"] is False and out["budget_mb"] == 256
    knobs = {k["setting"]: k for k in out["knobs"]}
    assert {"train.batch_size", "train.gradient_checkpointing", "train.cache_image_features"} <= set(knobs)
    assert knobs["train.batch_size"]["change"] == "8 -> 4 (grad_accum 1 -> 2)"
    for knob in out["knobs"]:
        assert knob["peak_mb"] < out["peak_memory_mb"]
        assert knob["saves_mb"] == pytest.approx(out["peak_memory_mb"] - knob["peak_mb"], abs=0.001)
    assert "rtx-3070" in " ".join(out["notes"])  # --vram alone: time at the listed card closest in memory
    table = run(write_recipe(train={"batch_size": 8}), "--vram", "0.25")
    assert "does not fit" in table.output and "train.batch_size" in table.output


def test_without_processor_files_the_familys_formula_stands_in(tiny_model_dir, task_dir, tmp_path):
    """Only config.json: LLaVA's formula, (image size / patch)^2, gives the processor's count."""
    shutil.copy(tiny_model_dir("llava") / "config.json", tmp_path / "config.json")
    planned = tiny_plan(lambda family: tmp_path, task_dir)
    assert not planned.data.exact and planned.image_tokens_per_sample == 16
    assert any("formula" in note for note in planned.notes)


def test_no_config_json_is_one_line(write_recipe, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run(write_recipe(model={"path": str(tmp_path / "empty")})), "model.path", "config.json")


def test_unreachable_hub_model_is_one_line(write_recipe, monkeypatch):
    import huggingface_hub

    def unreachable(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    assert_one_line_error(run(write_recipe(model={"path": "nobody/no-such-model"})), "model.path", "nobody/no-such-model", "config.json")


def test_unknown_gpu_lists_the_known_ones(write_recipe):
    assert_one_line_error(run(write_recipe(), "--gpu", "rtx-9090"), "--gpu rtx-9090", "known: ", "rtx-4090", "a100-80gb")


def test_zero_vram_is_one_line(write_recipe):
    assert_one_line_error(run(write_recipe(), "--vram", "0"), "--vram", "more than 0")


def test_an_optimizer_cpus_cannot_run_is_one_line(write_recipe):
    result = run(write_recipe(train={"optimizer": "paged_adamw_8bit"}), "--device", "cpu")
    assert_one_line_error(result, "train.optimizer", "--gpu")


def test_data_parallel_gpus_add_ddp_buckets_per_gpu_and_multiply_the_global_batch(tiny_model_dir, task_dir, write_recipe):
    one = tiny_plan(tiny_model_dir, task_dir)
    two = tiny_plan(tiny_model_dir, task_dir, target={"gpu": "rtx-4090", "gpus": 2})
    buckets = one.shape.trainable_params * 4 / 2**20  # one fp32 gradient copy, what DDP all-reduces
    assert two.prediction.parts_mb["ddp_buckets"] == pytest.approx(buckets)
    assert two.prediction.peak_mb == pytest.approx(one.prediction.peak_mb + buckets)
    assert two.tokens_per_step == pytest.approx(2 * one.tokens_per_step)
    assert two.to_json()["gpus"] == 2 and "ddp_buckets" not in one.prediction.parts_mb
    assert_one_line_error(run(write_recipe(), "--gpu", "rtx-4090", "--gpus", "0"), "--gpus 0")
