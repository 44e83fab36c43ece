"""Every problem of a training data file, found when it is read, before any model weights load.

``inspect_data(recipe)`` reads data.train and data.eval with the recipe's model's processor (its
tokenizer, chat template and image processor, with model.processor applied; no weights) and
returns a DataReport: one line per problem naming the file, the entry's index and id, and the fix;
warnings; and each entry's shape (image sizes, image / prompt / answer tokens). Training calls it
and stops on the first problem (``DataReport.raise_if_problems``); ``edgetune data check`` prints
them all with the statistics.

A problem is what would stop training or make an entry useless, checked entry by entry:
- what edgetune.data.read_entries refuses (no image, a missing or unreadable image, turns out of
  order, a first turn not the human's, an empty answer, a repeated id, ...);
- an image the family's processor cannot take (ModelFamily.image_problem), at its size as
  edgetune.data.open_image delivers it (EXIF orientation applied), read from the file's header;
- conversation text containing one of the model's special-token strings (the tokenizer's special
  and added special tokens, the processor's image tokens): the processor would read it as the token,
  not as text, and the image tokens would no longer match the images;
- an entry the family cannot encode (e.g. PaliGemma and more than one question);
- an entry whose answers data.max_length would cut entirely (training cuts at max_length: an entry
  whose answers are cut only in part is a warning, with the count).

Token counts come from the family's own encode_sample, as training calls it, on blank images of
each image's size (the counts depend on the size only), each size through the image processor once.
"""

from __future__ import annotations

import contextlib
import re
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgetune.errors import UserError
from edgetune.recipe import Recipe

PROGRESS_FROM = 200  # entries in a file from which the check shows a progress bar
MEMO_SIZES = 64  # image sizes whose image-processor output the check keeps


@dataclass
class EntryShape:
    """One entry as training encodes it."""

    file: Path
    index: int
    id: str
    image_sizes: list[tuple[int, int]]  # (width, height), EXIF orientation applied
    tokens: int  # image tokens included, before data.max_length
    image_tokens: int
    answer_tokens: int  # tokens the loss reads (edgetune.train.answer_mask), before data.max_length
    kept_answer_tokens: int  # of those, the ones before the cut at data.max_length

    @property
    def prompt_tokens(self) -> int:
        """The text tokens that are not answers: template, questions, earlier turns."""
        return self.tokens - self.image_tokens - self.answer_tokens


@dataclass
class DataReport:
    family: str
    max_length: int
    files: dict[Path, int]  # data file -> its number of entries (0 if it could not be read)
    shapes: list[EntryShape]  # the entries without problems before encoding
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def raise_if_problems(self) -> None:
        """The first problem as a UserError (with how many more there are and how to list them)."""
        if not self.problems:
            return
        more = ""
        if len(self.problems) > 1:
            files = " ".join(str(path) for path in self.files)
            more = f" (and {len(self.problems) - 1} more; run `edgetune data check {files} --recipe RECIPE` for all)"
        raise UserError(self.problems[0] + more)

    def statistics(self, path: Path) -> dict[str, Any]:
        """What a user wants to know about one file before training; min / median / max triples."""
        shapes = [s for s in self.shapes if s.file == path]
        sizes = sorted((size for s in shapes for size in s.image_sizes), key=lambda wh: (wh[0] * wh[1], wh))
        over = [s for s in shapes if s.tokens > self.max_length]
        return {
            "entries": self.files[path],
            "images": len(sizes),
            "image_size": (sizes[0], sizes[len(sizes) // 2], sizes[-1]) if sizes else None,
            "image_tokens": spread([s.image_tokens for s in shapes]),
            "prompt_tokens": spread([s.prompt_tokens for s in shapes]),
            "answer_tokens": spread([s.answer_tokens for s in shapes]),
            "tokens": spread([s.tokens for s in shapes]),
            "over_max_length": len(over),
            "answers_cut_partly": sum(0 < s.kept_answer_tokens < s.answer_tokens for s in over),
            "answers_cut_entirely": sum(s.kept_answer_tokens == 0 for s in over),
        }


def spread(values: list[int]) -> tuple[int, float, int] | None:
    return (min(values), statistics.median(values), max(values)) if values else None


def inspect_data(recipe: Recipe) -> DataReport:
    """Check recipe.data.train and recipe.data.eval (if set) against the recipe's model; no weights load."""
    return inspect_files(recipe, [recipe.data.train] + ([recipe.data.eval] if recipe.data.eval else []))


def inspect_files(recipe: Recipe, paths: list[Path]) -> DataReport:
    """inspect_data for any LLaVA-format files, with the recipe's model, model.processor and data.max_length."""
    from edgetune.load import detect_family, load_model_processor

    family, config = detect_family(recipe.model)  # config.json only; a bad model.processor knob is a UserError
    processor = load_model_processor(family, recipe.model)  # missing tokenizer files: a UserError naming model.path
    specials = special_strings(processor)
    image_token = family.image_token_id(config)
    report = DataReport(family.name, recipe.data.max_length, {}, [])
    real_image_processor = processor.image_processor
    processor.image_processor = recent_sizes_memo(real_image_processor)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            blanks = BlankImages(Path(scratch))
            for path in paths:
                inspect_file(Path(path), family, processor, specials, image_token, blanks, report)
    finally:
        processor.image_processor = real_image_processor
    return report


def inspect_file(path: Path, family: Any, processor: Any, specials: list[str], image_token: int, blanks: "BlankImages",
                 report: DataReport) -> None:
    from edgetune.data import read_entries
    from edgetune.progress import step_progress

    try:
        entries, problems, report.files[path] = read_entries(path)
    except UserError as err:  # not a JSON list at all
        report.files[path] = 0
        report.problems.append(str(err))
        return
    problems_before = len(report.problems)
    report.problems += problems
    cut = []
    progress = step_progress(f"checking {path.name}") if len(entries) >= PROGRESS_FROM else None
    with progress or contextlib.nullcontext():
        task = progress.add_task(f"checking {path.name}", total=len(entries), stats="") if progress else None
        for index, sample in entries:
            shape = inspect_entry(path, index, sample, family, processor, specials, image_token, blanks, report)
            if shape is not None:
                report.shapes.append(shape)
                if 0 < shape.kept_answer_tokens < shape.answer_tokens:
                    cut.append(shape)
            if progress:
                progress.update(task, advance=1, stats=f"{len(report.problems)} problems")
    report.problems[problems_before:] = sorted(report.problems[problems_before:], key=entry_index)  # stable: in entry order
    if cut:
        lost = sum(s.answer_tokens - s.kept_answer_tokens for s in cut)
        total = sum(s.answer_tokens for s in cut)
        ids = ", ".join(s.id for s in cut[:5]) + (", ..." if len(cut) > 5 else "")
        report.warnings.append(
            f"{path}: {len(cut)} entries (ids {ids}) are longer than data.max_length={report.max_length}: training cuts "
            f"{lost} of their {total} answer tokens; raise data.max_length to {max(s.tokens for s in cut)} to keep them whole"
        )


def inspect_entry(path: Path, index: int, sample: Any, family: Any, processor: Any, specials: list[str], image_token: int,
                  blanks: "BlankImages", report: DataReport) -> EntryShape | None:
    """The entry's shape, or None after adding its problems to ``report``."""
    from edgetune.data import Sample, image_size
    from edgetune.train import answer_mask

    where = f"{path}: entry {index} (id {sample.id})"
    problems = []
    sizes = [image_size(image) for image in sample.images]
    for image, (width, height) in zip(sample.images, sizes):
        if problem := family.image_problem(processor, width, height):
            problems.append(f"{where}: image {image.name} ({width}x{height}): {problem}")
    for j, (_, text) in enumerate(sample.turns):
        if found := [token for token in specials if token in text]:
            problems.append(
                f"{where}: conversations[{j}] contains {', '.join(repr(t) for t in found)}, the model's own special "
                f"token{'s' if len(found) > 1 else ''}, which the processor would read as {'tokens' if len(found) > 1 else 'the token'} "
                "rather than text; remove or reword it"
            )
    if not problems:
        try:
            encoded = family.encode_sample(processor, Sample(sample.id, [blanks.of(size) for size in sizes], sample.turns), 2**31)
        except UserError as err:
            problems.append(f"{where}: {str(err).removeprefix(f'sample {sample.id}: ')}")
        except Exception as err:  # the processor's own refusal of something the checks above missed
            reason = (str(err).splitlines() or [""])[0]
            problems.append(f"{where}: the {family.name} processor cannot encode it ({type(err).__name__}: {reason}); fix or remove the entry")
    if problems:
        report.problems += problems
        return None
    ids, labels = encoded["input_ids"], encoded["labels"]
    shape = EntryShape(path, index, sample.id, sizes, len(ids), int((ids == image_token).sum()),
                       int(answer_mask(labels).sum()), int(answer_mask(labels[: report.max_length]).sum()))
    if shape.tokens > report.max_length and shape.kept_answer_tokens == 0:
        report.problems.append(
            f"{where}: {shape.tokens} tokens ({shape.image_tokens} of them image tokens) exceed data.max_length={report.max_length}, "
            f"which cuts its answer entirely; raise data.max_length to {shape.tokens}, or shrink the images or shorten the prompt"
        )
    return shape


def entry_index(problem: str) -> int:
    found = re.search(r": entry (\d+) ", problem)
    return int(found.group(1)) if found else -1


def special_strings(processor: Any) -> list[str]:
    """The strings the processor and its tokenizer turn into special tokens, longest first: the
    tokenizer's special and added special tokens, and the processor's own image tokens and tags
    (``image_token``, ``fake_image_token``, ``global_image_tag``, ...)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    strings = set(tokenizer.all_special_tokens)
    strings |= {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    for name, value in vars(processor).items():
        if name.endswith(("_token", "_tag")):
            strings.add(str(getattr(value, "content", value)))
    return sorted((s for s in strings if s.strip()), key=lambda s: (-len(s), s))


def recent_sizes_memo(image_processor: Any) -> Any:
    """edgetune.plan's BlankImageMemo (each size of blank image through the image processor once),
    keeping the outputs of the last MEMO_SIZES sizes only: a data set may have as many sizes as images."""
    from edgetune.plan import BlankImageMemo

    class RecentSizes(BlankImageMemo):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            out = super().__call__(*args, **kwargs)
            while len(self.outputs) > MEMO_SIZES:
                self.outputs.pop(next(iter(self.outputs)))  # the oldest
            return out

    return RecentSizes(image_processor)


class BlankImages:
    """A grey PNG of each size, written once: what the check encodes in place of the real images."""

    def __init__(self, folder: Path):
        self.folder = folder

    def of(self, size: tuple[int, int]) -> Path:
        from PIL import Image

        path = self.folder / f"{size[0]}x{size[1]}.png"
        if not path.exists():
            Image.new("RGB", size, (128, 128, 128)).save(path)
        return path


# ---- output -----------------------------------------------------------------------------------


def print_report(report: DataReport, console: Any) -> None:
    """The statistics as a rich table, one column per file (problems and warnings: the CLI's lines)."""
    from rich.table import Table

    table = Table(title=f"data check: {report.family}, data.max_length {report.max_length:,}", title_justify="left")
    table.add_column("")
    for path in report.files:
        table.add_column(path.name, justify="right")
    stats = [report.statistics(path) for path in report.files]
    rows = [
        ("entries", lambda s: f"{s['entries']:,}"),
        ("images", lambda s: f"{s['images']:,}"),
        ("image size, min / median / max", lambda s: " / ".join(f"{w}x{h}" for w, h in s["image_size"]) if s["image_size"] else "-"),
        ("image tokens per entry", lambda s: triple(s["image_tokens"])),
        ("prompt text tokens", lambda s: triple(s["prompt_tokens"])),
        ("answer tokens", lambda s: triple(s["answer_tokens"])),
        ("tokens per entry", lambda s: triple(s["tokens"])),
        (f"longer than {report.max_length:,}", lambda s: f"{s['over_max_length']:,}"),
        ("  answers cut partly / entirely", lambda s: f"{s['answers_cut_partly']:,} / {s['answers_cut_entirely']:,}"),
    ]
    for label, cell in rows:
        table.add_row(label, *(cell(s) for s in stats))
    console.print(table)
    checked = len(report.shapes)
    console.print(f"{checked:,} entries encoded, {len(report.problems):,} problems, {len(report.warnings):,} warnings")


def triple(values: tuple[int, float, int] | None) -> str:
    return f"{values[0]:,} / {values[1]:,g} / {values[2]:,}" if values else "-"
