"""End-of-run plots: metrics parsing (resume duplicates, cut-off lines), PNGs, and no-matplotlib."""
from __future__ import annotations

import json
import logging
import math
import sys

import pytest

from ple_fast.plots import INSTALL_HINT, load_curves, plot_run, read_metrics


def align_record(iteration, tau, share, loss, algo="ple"):
    return {"phase": "align", "algo": algo, "iteration": iteration, "step": iteration * 4, "tau": tau,
            "ranked_share": share, "mean_delta": 0.1 * iteration, "mean_reward": -1.0 + 0.2 * iteration,
            "mean_reward_principled": -0.5 + 0.2 * iteration, "loss": loss, "dropped_pairs": 0}


def write_metrics(run_dir, records, tail=""):
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) if isinstance(r, dict) else r for r in records]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n" + tail)
    return run_dir / "metrics.jsonl"


def resumed_run_records():
    """An SFT warm-up, then iterations 1-3, a crash, and a resume that logs iteration 3 again."""
    return ([{"phase": "sft", "step": s, "loss": 3.0 - 0.01 * s, "tokens_per_s": 100.0} for s in (0, 50, 99)]
            + [{"phase": "eval", "when": "sft", "mean_reward": -1.0}]
            + [align_record(1, 0.2, 0.5, 2.0), align_record(2, 0.18, None, 1.5),
               align_record(3, 0.162, 0.9, 99.0)]
            + ["", '{"phase": "align", "iteration": 4, "tau"']           # cut off by SIGKILL
            + [align_record(3, 0.162, 0.7, 1.25), align_record(4, 0.1458, 0.8, 1.0),
               {"phase": "eval", "when": "final", "mean_reward": 0.0}, "[1, 2]"])


def test_load_curves_dedupes_resumed_iterations_and_skips_bad_lines(tmp_path, caplog):
    path = write_metrics(tmp_path, resumed_run_records(), tail='{"phase": "sft", "st')
    with caplog.at_level(logging.WARNING, logger="ple_fast.plots"):
        curves = load_curves(path)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 3
    assert f"{path}:9: skipping a line that is not JSON" in warnings[0]
    assert f"{path}:13: skipping a line that is not a JSON object" in warnings[1]
    assert f"{path}:14: skipping a line that is not JSON" in warnings[2]
    assert curves.algo == "ple"
    assert curves.sft_step == [0, 50, 99] and curves.sft_loss == [3.0 - 0.01 * s for s in (0, 50, 99)]
    assert curves.iteration == [1, 2, 3, 4]
    assert curves.tau == [0.2, 0.18, 0.162, 0.1458]
    assert curves.align_loss == [2.0, 1.5, 1.25, 1.0]                 # the resumed iteration 3 wins
    assert curves.ranked_share[0] == 0.5 and math.isnan(curves.ranked_share[1])
    assert curves.ranked_share[2:] == [0.7, 0.8]
    assert curves.mean_reward_principled == pytest.approx([-0.3, -0.1, 0.1, 0.3])
    assert len(read_metrics(path)) == 10


def test_missing_metrics_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl' does not exist"):
        load_curves(tmp_path / "metrics.jsonl")


def test_without_matplotlib_returns_nothing_and_says_how_to_install(tmp_path, monkeypatch, caplog):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)            # import raises ImportError
    write_metrics(tmp_path, resumed_run_records())
    with caplog.at_level(logging.INFO, logger="ple_fast.plots"):
        assert plot_run(tmp_path) == []
    assert [r.getMessage() for r in caplog.records] == [
        f"plots skipped: matplotlib is not installed ({INSTALL_HINT})"]
    assert INSTALL_HINT == "pip install 'ple_fast[plots]'"
    assert not (tmp_path / "plots").exists()


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_pngs_for_ple_baseline_sft_only_and_empty_runs(tmp_path):
    pytest.importorskip("matplotlib")
    ple = tmp_path / "ple"
    write_metrics(ple, resumed_run_records())
    paths = plot_run(ple)
    assert [p.name for p in paths] == ["rewards.png", "ranked_share.png", "loss.png"]
    assert all(p.parent == ple / "plots" for p in paths)
    assert _png_size(paths[0]) == (768, 480)
    assert _png_size(paths[2]) == (1200, 480)                  # two panels: SFT steps, iterations

    raft = tmp_path / "raft"                                    # baselines have no ranking share
    write_metrics(raft, [align_record(i, 0.2, None, 1.0, algo="raft") for i in (1, 2)])
    assert [p.name for p in plot_run(raft)] == ["rewards.png", "loss.png"]
    assert _png_size(raft / "plots" / "loss.png") == (600, 480)

    sft_only = tmp_path / "sft"
    write_metrics(sft_only, [{"phase": "sft", "step": 0, "loss": 2.0}, {"phase": "eval", "when": "sft"}])
    assert [p.name for p in plot_run(sft_only)] == ["loss.png"]

    empty = tmp_path / "empty"
    write_metrics(empty, [{"phase": "eval", "when": "final"}])
    assert plot_run(empty) == [] and not (empty / "plots").exists()


def test_iteration_axes_tick_whole_numbers_and_the_warmup_loss_is_logarithmic(tmp_path, monkeypatch):
    """Iterations get integer ticks (a 3-iteration run showed 1.5, 2.5); the SFT loss, which falls by
    orders of magnitude, a log scale; RAFT's rewards plot its best and second-best samples."""
    pytest.importorskip("matplotlib")
    import ple_fast.plots as plots

    figures = {}
    monkeypatch.setattr(plots, "_save", lambda figure, path: figures.setdefault(path.name, figure) and path)
    raft = [dict(align_record(i, 0.2, None, 1.0, algo="raft"), mean_reward_best=0.5 + i, mean_reward_second=i)
            for i in (1, 2, 3)]
    plot_run(write_metrics(tmp_path, [{"phase": "sft", "step": s, "loss": 10.0 ** -s} for s in range(3)]
                           + raft).parent)
    sft_axes, align_axes = figures["loss.png"].axes
    assert sft_axes.get_yscale() == "log" and align_axes.get_yscale() == "linear"
    for axes in (align_axes, figures["rewards.png"].axes[0]):
        assert all(float(t).is_integer() for t in axes.get_xticks())
    best, second = figures["rewards.png"].axes[0].get_lines()
    assert list(best.get_ydata()) == [1.5, 2.5, 3.5] and list(second.get_ydata()) == [1, 2, 3]
