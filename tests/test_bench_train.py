"""benchmarks/bench_train.py's pure logic: the image plans hit their token budgets, the question fit
is the longest within the sequence, per-step numbers from metrics.jsonl (with and without the per-step
fields), tokens/s without the warm-up step, and the RESULT line's exact format."""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("bench_train", ROOT / "benchmarks/bench_train.py")
bench_train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_train)


def test_tile_grid_fills_the_budget_without_exceeding_it():
    # SmolVLM at 1,024 tokens: 85% -> 870 image tokens -> a 3 x 4 grid + the global image, 13 x 66 = 858
    assert bench_train.tile_grid(870, 64) == (3, 4)
    assert bench_train.tile_grid(435, 64) == (2, 2)  # 5 x 66 = 330; 2 x 3 + 1 = 7 x 66 = 462 would exceed
    assert bench_train.tile_grid(198, 64) == (1, 2)  # exactly 3 x 66
    assert bench_train.tile_grid(197, 64) is None  # not even 1 x 2: one unsplit tile
    for budget in range(200, 2000, 37):
        rows, cols = bench_train.tile_grid(budget, 64)
        assert (rows * cols + 1) * 66 <= budget and rows <= cols <= 4


def test_patch_grid_is_near_square_within_the_budget():
    assert bench_train.patch_grid(870) == (29, 30)
    for budget in (1, 2, 50, 217, 870, 3000):
        rows, cols = bench_train.patch_grid(budget)
        assert rows * cols <= budget and abs(rows - cols) <= rows // 2 + 1


def test_most_words_within_is_the_longest_that_fits():
    def length(n):  # grows, not linearly
        return 300 + 3 * n + n // 7

    n = bench_train.most_words_within(length, 1024)
    assert length(n) <= 1024 < length(n + 1)
    assert bench_train.most_words_within(length, 300) == 0
    with pytest.raises(SystemExit, match="image alone takes 300 tokens"):
        bench_train.most_words_within(length, 299)


def test_edgetune_steps_reads_per_step_fields_and_skips_eval_records():
    records = [
        {"step": 1, "loss": 11.0, "tokens": 1000, "step_s": 9.0, "tokens_per_s": 111.1, "peak_mem_mb": 900.0},
        {"step": 2, "loss": 10.5, "tokens": 1000, "step_s": 4.0, "tokens_per_s": 153.8, "peak_mem_mb": 1000.0},
        {"step": 2, "eval_loss": 10.4},
        {"step": 3, "loss": 10.0, "tokens": 1000, "step_s": 6.0, "tokens_per_s": 157.9, "peak_mem_mb": 1000.0},
    ]
    steps = bench_train.edgetune_steps(records, tokens_per_step=1)
    assert [s["step_s"] for s in steps] == [9.0, 4.0, 6.0]
    summary = bench_train.summarize(steps)
    assert summary["tok_s"] == pytest.approx(2000 / 10.0)  # the warm-up step is not timed
    assert summary["step_s"] == pytest.approx(5.0)
    assert summary["peak_mb"] == 1000.0 and summary["first_loss"] == 11.0


def test_edgetune_steps_derives_step_times_from_the_cumulative_rate():
    # an older edgetune: only the cumulative tokens/s; steps of 10 s, 5 s, 5 s at 500 tokens each
    records = [{"step": i + 1, "loss": 1.0, "tokens_per_s": 500 * (i + 1) / t, "peak_mem_mb": 1.0} for i, t in enumerate((10, 15, 20))]
    steps = bench_train.edgetune_steps(records, tokens_per_step=500)
    assert [s["step_s"] for s in steps] == pytest.approx([10, 5, 5])
    assert bench_train.summarize(steps)["tok_s"] == pytest.approx(100.0)


def test_result_line_has_the_exact_format():
    edgetune = {"peak_mb": 1234.4, "tok_s": 5.678}
    baseline = {"peak_mb": 2345.6, "tok_s": 4.5}
    line = bench_train.result_line("qwen2-vl-2b", edgetune, baseline)
    assert line == "RESULT shape=qwen2-vl-2b edgetune_peak_mb=1234 baseline_peak_mb=2346 edgetune_tok_s=5.68 baseline_tok_s=4.50"
    failed = bench_train.result_line("smolvlm-256m", {"error": "exit 1"}, baseline)
    assert re.fullmatch(r"RESULT shape=smolvlm-256m edgetune_peak_mb=nan baseline_peak_mb=2346 edgetune_tok_s=nan baseline_tok_s=4\.50", failed)
