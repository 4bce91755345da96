"""End-of-run PNGs from metrics.jsonl: rewards per iteration, ranking-branch share against tau, loss.

matplotlib is optional (`pip install 'ple_fast[plots]'`). Figures are drawn with the object API on
an Agg canvas, so nothing touches pyplot's global state or the user's chosen backend.

metrics.jsonl is read forgivingly: a run killed with SIGKILL can leave a cut-off last line, and a
resumed run logs again the iterations after its last checkpoint, so unparseable lines are skipped
(with a warning naming file:line) and a repeated step or iteration keeps its latest record.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'ple_fast[plots]'"


@dataclass
class Curves:
    """The series the plots draw; None in the metrics becomes NaN (a gap in the line)."""
    algo: str | None = None
    sft_step: list[int] = field(default_factory=list)
    sft_loss: list[float] = field(default_factory=list)
    iteration: list[int] = field(default_factory=list)
    tau: list[float] = field(default_factory=list)
    ranked_share: list[float] = field(default_factory=list)
    mean_reward: list[float] = field(default_factory=list)
    mean_reward_principled: list[float] = field(default_factory=list)
    mean_delta: list[float] = field(default_factory=list)
    mean_reward_best: list[float] = field(default_factory=list)       # RAFT: its best and second-best samples
    mean_reward_second: list[float] = field(default_factory=list)
    align_loss: list[float] = field(default_factory=list)


def _number(record: dict, key: str) -> float:
    value = record.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The JSON objects of a metrics.jsonl, skipping (and warning about) lines that are not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file {str(path)!r} does not exist")
    records = []
    with open(path) as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                log.warning("%s:%d: skipping a line that is not JSON (%s)", path, number, err)
                continue
            if not isinstance(record, dict):
                log.warning("%s:%d: skipping a line that is not a JSON object", path, number)
                continue
            records.append(record)
    return records


def load_curves(path: str | os.PathLike) -> Curves:
    """SFT and alignment series from metrics.jsonl, sorted, the latest record per step/iteration."""
    sft: dict[int, dict] = {}
    align: dict[int, dict] = {}
    for record in read_metrics(path):
        phase = record.get("phase")
        if phase == "sft" and isinstance(record.get("step"), int):
            sft[record["step"]] = record
        elif phase == "align" and isinstance(record.get("iteration"), int):
            align[record["iteration"]] = record
    curves = Curves()
    for step in sorted(sft):
        curves.sft_step.append(step)
        curves.sft_loss.append(_number(sft[step], "loss"))
    for iteration in sorted(align):
        record = align[iteration]
        curves.algo = record.get("algo", curves.algo)
        curves.iteration.append(iteration)
        for key in ("tau", "ranked_share", "mean_reward", "mean_reward_principled", "mean_delta", "mean_reward_best",
                    "mean_reward_second"):
            getattr(curves, key).append(_number(record, key))
        curves.align_loss.append(_number(record, "loss"))
    return curves


def _matplotlib():
    """(Figure, FigureCanvasAgg, MaxNLocator), or None when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return None
    return Figure, FigureCanvasAgg, MaxNLocator


def _iteration_axis(mpl, ax) -> None:
    ax.set_xlabel("iteration")
    ax.xaxis.set_major_locator(mpl[2](integer=True))     # iterations are whole numbers


def _new_figure(mpl, width=6.4, height=4.0, panels=1):
    Figure, FigureCanvasAgg, _ = mpl
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    axes = [figure.add_subplot(1, panels, i + 1) for i in range(panels)]
    return figure, axes


def _save(figure, path: Path) -> Path:
    figure.savefig(path, dpi=120)
    return path


def plot_rewards(mpl, curves: Curves, path: Path) -> Path:
    figure, (ax,) = _new_figure(mpl)
    if curves.algo == "raft":
        ax.plot(curves.iteration, curves.mean_reward_best, "o-", label="best sample")
        ax.plot(curves.iteration, curves.mean_reward_second, "s-", label="second-best sample")
    else:
        ax.plot(curves.iteration, curves.mean_reward, "o-", label="original r(y)")
        ax.plot(curves.iteration, curves.mean_reward_principled, "s-", label="principle-guided r(y_p)")
    _iteration_axis(mpl, ax)
    ax.set_ylabel("mean reward")
    ax.set_title(f"Rewards of both responses per iteration ({curves.algo or 'align'})")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(figure, path)


def plot_ranked_share(mpl, curves: Curves, path: Path) -> Path:
    figure, (ax,) = _new_figure(mpl)
    share_line, = ax.plot(curves.iteration, curves.ranked_share, "o-", color="C0", label="ranking-branch share")
    _iteration_axis(mpl, ax)
    ax.set_ylabel("share of pairs with delta > tau")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    tau_ax = ax.twinx()
    tau_line, = tau_ax.plot(curves.iteration, curves.tau, "s--", color="C1", label="tau")
    tau_ax.set_ylabel("tau")
    ax.legend(handles=[share_line, tau_line], loc="best")
    ax.set_title("Ranking-branch share against the threshold tau")
    return _save(figure, path)


def plot_loss(mpl, curves: Curves, path: Path) -> Path:
    panels = [(x, y, xlabel, title) for x, y, xlabel, title in (
        (curves.sft_step, curves.sft_loss, "SFT step", "SFT warm-up loss"),
        (curves.iteration, curves.align_loss, "iteration", f"{curves.algo or 'alignment'} loss (mean per iteration)"))
        if x]
    figure, axes = _new_figure(mpl, width=5.0 * len(panels), panels=len(panels))
    for ax, (x, y, xlabel, title) in zip(axes, panels):
        ax.plot(x, y, "o-" if len(x) < 50 else "-")
        if xlabel == "iteration":
            _iteration_axis(mpl, ax)
        else:                            # the warm-up's loss falls by orders of magnitude: a log scale
            ax.set_xlabel(xlabel)
            if all(v > 0 for v in y if not math.isnan(v)):
                ax.set_yscale("log")
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    return _save(figure, path)


def plot_run(run_dir: str | os.PathLike) -> list[Path]:
    """Write run_dir/plots/{rewards,ranked_share,loss}.png from run_dir/metrics.jsonl.

    Returns the PNGs written: rewards and loss when the run has alignment records (loss also for
    SFT-only runs), ranked_share only when some iteration has a ranking-branch share (not the
    baselines). Without matplotlib returns [] after one log line saying how to install it.
    """
    mpl = _matplotlib()
    if mpl is None:
        log.warning("plots skipped: matplotlib is not installed (%s)", INSTALL_HINT)
        return []
    run_dir = Path(run_dir)
    curves = load_curves(run_dir / "metrics.jsonl")
    out = run_dir / "plots"
    written = []
    if curves.iteration:
        out.mkdir(parents=True, exist_ok=True)
        written.append(plot_rewards(mpl, curves, out / "rewards.png"))
        if any(not math.isnan(v) for v in curves.ranked_share):
            written.append(plot_ranked_share(mpl, curves, out / "ranked_share.png"))
    if curves.iteration or curves.sft_step:
        out.mkdir(parents=True, exist_ok=True)
        written.append(plot_loss(mpl, curves, out / "loss.png"))
    return written


def plot_sweep(rows: list[dict], axes: list[str], metrics: list[tuple[str, str]], out: Path) -> list[Path]:
    """A sweep's PNGs from its summary rows (ple_fast.sweep.summarize): metrics.png, each metric's mean ±
    std over seeds against the first axis with a line per combination of the others; ranked_share.png,
    the ranking-branch share per iteration of each row that ranks. [] without matplotlib."""
    mpl = _matplotlib()
    if mpl is None:
        log.warning("plots skipped: matplotlib is not installed (%s)", INSTALL_HINT)
        return []
    out.mkdir(parents=True, exist_ok=True)
    first, rest = axes[0], axes[1:]
    xs = list(dict.fromkeys(row["labels"][first] for row in rows))
    series: dict[tuple, dict] = {}
    for row in rows:
        series.setdefault(tuple(row["labels"][a] for a in rest), {})[row["labels"][first]] = row
    shown = [(key, title) for key, title in metrics if any(key in row["metrics"] for row in rows)]
    written = []
    if shown:
        figure, panels = _new_figure(mpl, width=4.2 * len(shown), height=3.6, panels=len(shown))
        for ax, (key, title) in zip(panels, shown):
            for n, (name, by_x) in enumerate(series.items()):
                points = [(i, by_x[x]["metrics"][key]) for i, x in enumerate(xs) if x in by_x and key in by_x[x]["metrics"]]
                if points:
                    shift = (n - (len(series) - 1) / 2) * 0.06        # side by side, so error bars do not overlap
                    ax.errorbar([i + shift for i, _ in points], [m for _, (m, _) in points],
                                yerr=[s for _, (_, s) in points], marker="o", capsize=3,
                                label=", ".join(name) if name else None)
            ax.set_xticks(range(len(xs)), xs, rotation=20 if max(map(len, xs)) > 6 else 0)
            ax.set_xlabel(first)
            ax.set_title(title)
            ax.grid(alpha=0.3)
        if rest:
            panels[0].legend(title=", ".join(rest), fontsize="small")
        written.append(_save(figure, out / "metrics.png"))
    ranked = [row for row in rows if any(not math.isnan(m) for m, _ in row["ranked_share"])]
    if ranked:
        figure, (ax,) = _new_figure(mpl, width=6.4, height=4.0)
        for n, row in enumerate(ranked):           # past ten rows the colours repeat: the line style tells them apart
            its = range(1, len(row["ranked_share"]) + 1)
            ax.errorbar(list(its), [m for m, _ in row["ranked_share"]], yerr=[s for _, s in row["ranked_share"]],
                        marker="os^D"[n // 10 % 4], linestyle=("-", "--", ":", "-.")[n // 10 % 4], capsize=3,
                        label=", ".join(row["labels"][a] for a in axes))
        _iteration_axis(mpl, ax)
        ax.set_ylabel("share of pairs with delta > tau")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(title=", ".join(axes), fontsize="x-small", ncol=2)
        ax.set_title("Ranking-branch share per iteration (mean ± std over seeds)")
        written.append(_save(figure, out / "ranked_share.png"))
    return written
