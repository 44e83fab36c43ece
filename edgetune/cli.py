"""The ``edgetune`` command line: one verb per stage, each reading the previous stage's artifact.

Bad input raises UserError anywhere below; here it becomes one line on stderr and exit code 2
(the traceback only with --debug). Heavy imports (torch, transformers) happen inside the verbs
that need them, so ``infer`` and ``eval`` on a bundle stay torch-free.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

import typer

from edgetune.errors import UserError
from edgetune.families import FAMILIES

FAMILY_NAMES = ", ".join(sorted(FAMILIES))

app = typer.Typer(
    help="Fine-tune a multimodal LLM on a 4-bit backbone, merge, export to ONNX, run it offline.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors (or set EDGETUNE_DEBUG=1).")) -> None:
    from edgetune.progress import debug_enabled, quiet_libraries, set_debug

    set_debug(debug)
    if not debug_enabled():
        quiet_libraries()


def user_errors(command: Callable) -> Callable:
    """UserError -> one line on stderr, exit 2; anything else -> one line, exit 1 (tracebacks with --debug)."""

    from edgetune.progress import debug_enabled

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except UserError as err:
            if debug_enabled():
                raise
            say(f"error: {err}", fg="red")
            raise typer.Exit(2) from None
        except KeyboardInterrupt as err:  # a stage that kept something says what in the message
            say(str(err) or "interrupted; nothing was written")
            raise typer.Exit(130) from None
        except Exception as err:
            if debug_enabled():
                raise
            say(f"error: {type(err).__name__}: {err} (re-run with --debug for the traceback)", fg="red")
            raise typer.Exit(1) from None

    return wrapper


def say(message: str, fg: str | None = None) -> None:
    """One line on stderr; under a multi-process launch only the main process speaks (the others
    meet the same error, or stop because it did)."""
    import os

    if os.environ.get("RANK", "0") == "0":
        typer.secho(message, fg=fg, err=True)


@app.command()
@user_errors
def quickstart(
    out: Path = typer.Option(Path("quickstart-out"), "--out", help="Directory for everything the quickstart makes."),
    family: str = typer.Option("llava", "--family", help=f"Model family of the tiny model: {FAMILY_NAMES}."),
    steps: int = typer.Option(800, "--steps", help="Training steps."),
    precision: str = typer.Option("fp32", "--precision", help="bundle/'s precision: fp32, fp16, int8 or int4 (the others go to bundles/)."),
) -> None:
    """Run the whole chain offline on a tiny model and a built-in task: train, merge, export, answer with ONNX."""
    from edgetune.quickstart import run_quickstart

    run_quickstart(out, family=family, steps=steps, precision=precision)


@app.command()
@user_errors
def train(
    recipe: Optional[Path] = typer.Argument(None, help="Recipe YAML (with --resume: optional; default the run's own)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a recipe key: --set train.lr=1e-4 (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default: runs/<recipe name>-<time>)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Shortcut for --set train.max_steps=N."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Shortcut for --set train.seed=N (same seed, same result on CPU)."),
    resume: Optional[Path] = typer.Option(
        None, "--resume", help="Continue this unfinished run directory from its newest checkpoint (keys a resume may change: --set)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run directory."),
    num_processes: Optional[int] = typer.Option(
        None, "--num-processes", help="Data-parallel processes, one per GPU (CPU processes without one): runs accelerate launch."
    ),
) -> None:
    """Fine-tune a PEFT method on the 4-bit backbone per RECIPE; writes a run directory, resumable after a crash."""
    from edgetune.recipe import load_recipe
    from edgetune.train import train as run_training

    if num_processes is not None and num_processes < 1:
        raise UserError(f"--num-processes {num_processes}: give at least 1 (the number of GPUs, or CPU processes)")
    overrides = list(set_ or [])
    overrides += [f"train.max_steps={max_steps}"] if max_steps is not None else []
    overrides += [f"train.seed={seed}"] if seed is not None else []
    if resume is not None:
        if out is not None and out.resolve() != resume.resolve():
            raise UserError(f"--out {out} and --resume {resume} name different run directories; give one")
        if recipe is None and not (resume / "recipe.yaml").is_file():
            raise UserError(f"--resume {resume}: no recipe.yaml there; is it a run directory of edgetune train?")
        run_dir = resume
        parsed = load_recipe(recipe or resume / "recipe.yaml", overrides)
    elif recipe is None:
        raise UserError("give a recipe: edgetune train RECIPE.yaml (or --resume RUN_DIR to continue a run)")
    else:
        parsed = load_recipe(recipe, overrides)
        run_dir = out or Path("runs") / f"{recipe.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if num_processes and num_processes > 1:
        from edgetune.launch import launch_training

        args = ["train", *([str(recipe)] if recipe else []), "--out", str(run_dir)]
        args += [arg for item in overrides for arg in ("--set", item)]
        args += (["--resume", str(run_dir)] if resume else []) + (["--overwrite"] if overwrite else [])
        raise typer.Exit(launch_training(args, num_processes, run_dir, parsed))
    result = run_training(parsed, run_dir, overwrite, resume=resume is not None)
    import os

    if os.environ.get("RANK", "0") == "0":
        typer.echo(f"run written to {run_dir} (loss {result.first_loss:.3f} -> {result.final_loss:.3f}, {result.train_seconds:.0f}s)")


@app.command()
@user_errors
def plan(
    recipe: Path = typer.Argument(..., help="Recipe YAML."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a recipe key: --set train.batch_size=2 (repeatable)."),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="Plan for this GPU, e.g. rtx-4090 (an unknown name lists the known ones)."),
    vram: Optional[float] = typer.Option(None, "--vram", help="Plan for a GPU with this many GB (with --gpu: instead of its own)."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda or cpu (this machine); default: the recipe's, else a visible GPU, else cpu."),
    gpus: int = typer.Option(1, "--gpus", help="Data-parallel GPUs (--num-processes of train): memory per GPU, the global batch."),
    json_: bool = typer.Option(False, "--json", help="Print one JSON object instead of the tables."),
) -> None:
    """Predict peak memory by part, image tokens and time per step for RECIPE, from config files alone (no weights)."""
    import json

    from edgetune.plan import plan_recipe, print_plan
    from edgetune.progress import console
    from edgetune.recipe import load_recipe

    result = plan_recipe(load_recipe(recipe, set_ or []), recipe.stem, gpu=gpu, vram=vram, device=device, gpus=gpus)
    if json_:
        typer.echo(json.dumps(result.to_json(), indent=2))
    else:
        print_plan(result, console)


@app.command()
@user_errors
def sweep(
    recipe: Path = typer.Argument(..., help="Recipe YAML; its method section is replaced per run."),
    methods: str = typer.Option("lora,adapter,llama_adapter,ia3,prefix,adalink", "--methods", help="Comma-separated methods."),
    seeds: int = typer.Option(1, "--seeds", help="Seeds per (method, connector); accuracy is reported as mean ± std."),
    connector: str = typer.Option("on", "--connector", help="Connector tuning: on, off or on,off."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a recipe key for every run (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output directory (default: runs/sweep-<recipe name>-<time>)."),
) -> None:
    """Compare PEFT methods on the same data and step budget: accuracy, parameters, memory, time, ONNX accuracy."""
    from edgetune.recipe import load_recipe
    from edgetune.sweep import parse_connector, run_sweep

    parsed = load_recipe(recipe, set_ or [])
    target = out or Path("runs") / f"sweep-{recipe.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_sweep(parsed, [m.strip() for m in methods.split(",") if m.strip()], seeds, parse_connector(connector), target)
    typer.echo(f"sweep written to {target} (sweep.md, sweep.png, sweep.json)")


@app.command()
@user_errors
def merge(
    run_dir: Path = typer.Argument(..., help="A run directory from `edgetune train`."),
    out: Optional[Path] = typer.Option(None, "--out", help="Merged model directory (default: RUN_DIR-merged)."),
    overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """Dequantize the 4-bit base to fp32, merge the adapter there, save a transformers model directory."""
    from edgetune.merge import dequantize_then_merge

    report = dequantize_then_merge(run_dir, out or run_dir.with_name(run_dir.name + "-merged"), overwrite)
    typer.echo(f"merged model written to {report.merged_dir}; max |logit diff| adapted vs merged: {report.max_logit_diff:.2e}")


@app.command()
@user_errors
def export(
    source: Path = typer.Argument(..., help="A run directory or a merged model directory."),
    out: Optional[Path] = typer.Option(None, "--out", help="Bundle directory (default: export/<name>)."),
    precision: str = typer.Option("fp32", "--precision", help="Decoder and embedding weights: fp32, fp16, int8 or int4."),
    vision_precision: Optional[str] = typer.Option(
        None, "--vision-precision", help="Vision graph weights: fp32, fp16, int8 or int4, never below --precision (default: fp32, fp16, int8, int8)."
    ),
    block_size: int = typer.Option(32, "--block-size", help="int4/int8: input features per quantization block (a power of two >= 16)."),
    accuracy_level: int = typer.Option(4, "--accuracy-level", help="int4/int8: MatMulNBits compute type, 0 (fp32) to 4 (int8, fastest on CPU)."),
    asymmetric: bool = typer.Option(False, "--asymmetric", help="int4/int8: a zero point per block (default: symmetric)."),
    lm_head_bits: Optional[int] = typer.Option(
        None, "--lm-head-bits", help="int4: bits of the LM head (and of a table tied to it), 4 or 8 (default: 8 if tied, else 4)."
    ),
    eval_samples: int = typer.Option(64, "--eval-samples", help="Held-out questions each fidelity stage answers (0: none)."),
    ort: bool = typer.Option(False, "--ort", help="Also write ORT-format graphs (+ required_operators.config) for mobile builds."),
    overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """Export to an ONNX bundle (vision, embeddings, decoder with KV cache) and report its fidelity to PyTorch."""
    from edgetune.export.precision import precision_options
    from edgetune.pipeline import export_any

    options = precision_options(precision, vision_precision, block_size, accuracy_level, not asymmetric, lm_head_bits)  # before any work
    if ort:
        from edgetune.export.graphs import OPSET
        from edgetune.export.mobile import ort_format_problem

        if problem := ort_format_problem(OPSET):
            raise UserError(f"--ort: {problem}")
    bundle = out or Path("export") / source.name
    manifest = export_any(source, bundle, options, overwrite, eval_samples=eval_samples, ort=ort)
    final = manifest["fidelity"][-1]
    typer.echo(f"bundle written to {bundle} ({final['bundle_mb']:.1f} MB, {final['stage']}: KL {final['kl']:.1e} vs the merged fp32 model)")


@app.command()
@user_errors
def infer(
    bundle: Path = typer.Argument(..., help="A bundle directory from `edgetune export`."),
    image: Path = typer.Option(..., "--image", help="Image file."),
    prompt: str = typer.Option(..., "--prompt", help="Question or instruction."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: Optional[int] = typer.Option(None, "--seed"),
) -> None:
    """Answer PROMPT about IMAGE with the ONNX bundle (onnxruntime only; no torch), streaming tokens."""
    from edgetune.runtime import OnnxVLM

    vlm = OnnxVLM.load(bundle)
    for piece in vlm.stream(image, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


@app.command("eval")
@user_errors
def eval_(
    path: Path = typer.Argument(..., help="A run directory, merged model directory or bundle."),
    data: Path = typer.Option(..., "--data", help="LLaVA-format JSON with reference answers."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where to write the JSON report (default: PATH/eval.json)."),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens"),
) -> None:
    """Held-out accuracy (exact match of the first answer); prints it and writes it as JSON."""
    from edgetune.data import load_samples
    from edgetune.evaluate import evaluate_path

    samples = load_samples(data)
    report = evaluate_path(path, samples, max_new_tokens)
    target = out or Path(path) / "eval.json"
    target.write_text(report.to_json())
    typer.echo(f"accuracy {report.accuracy:.3f} ({report.correct}/{report.total}) -> {target}")


data_app = typer.Typer(help="Check training data before training.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("check")
@user_errors
def data_check(
    data: Optional[List[Path]] = typer.Argument(None, help="LLaVA-format JSON files (default: the recipe's data.train and data.eval)."),
    recipe: Path = typer.Option(..., "--recipe", help="Recipe YAML: its model's processor, model.processor and data.max_length."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a recipe key: --set data.max_length=512 (repeatable)."),
) -> None:
    """List every problem of DATA for RECIPE's model (no weights load) with statistics; exit 2 if there are any."""
    from edgetune.data_check import inspect_data, inspect_files, print_report
    from edgetune.progress import console
    from edgetune.recipe import load_recipe

    parsed = load_recipe(recipe, set_ or [])
    report = inspect_files(parsed, list(data)) if data else inspect_data(parsed)
    print_report(report, console)
    for warning in report.warnings:
        typer.secho(f"warning: {warning}", fg="yellow", err=True)
    for problem in report.problems:
        typer.secho(f"error: {problem}", fg="red", err=True)
    if report.problems:
        raise typer.Exit(2)


@app.command("tiny-model")
@user_errors
def tiny_model(
    family: str = typer.Argument(..., help=f"Model family, as transformers spells its model_type: {FAMILY_NAMES}."),
    out: Path = typer.Option(..., "--out", help="Directory to write the model to."),
) -> None:
    """Write an offline tiny random-weight model (config, safetensors, tokenizer, processor)."""
    from edgetune.families import get_family
    from edgetune.io import atomic_output_dir

    chosen = get_family(family)
    with atomic_output_dir(out) as scratch:
        chosen.build_tiny(scratch)
    typer.echo(f"tiny {family} model written to {out}")


if __name__ == "__main__":
    app()
