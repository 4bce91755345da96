"""`python -m ple_fast.sweep`: a grid of configs x seeds through the same trainer, and one table of it.

    python -m ple_fast.sweep --grid ple.algo=ple,raft task.aligned_share=0.1,0.4 --seeds 3 --out runs/sw
    python -m ple_fast.sweep --grid-file difficulty --jobs 2 --out runs/difficulty

Each cell is an ordinary `train` run in out/cells/<name>/. Cells whose configs differ only in keys
the warm-up never reads (AFTER_WARMUP: the algorithm, tau, the loss, rollout and evaluation) share
one SFT warm-up: the first of them runs it, and the others resume from its end-of-warm-up checkpoint,
which gives what a fresh run would (resume is exact; tests/test_sweep.py checks it). A finished cell
is not rerun; an interrupted one resumes from its own checkpoint. The sweep writes sweep.jsonl (a
record per cell), results.md (mean and standard deviation over seeds) and plots/*.png.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import statistics
import sys
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import yaml

from ple_fast.config import Config, ConfigError, InputError, build_config, leaves, parse_override, to_dict
from ple_fast.plots import plot_sweep

SHIPPED = Path(__file__).parent / "sweeps"
# keys read only after the warm-up's checkpoint: cells differing only here share their warm-up
AFTER_WARMUP = ("principle", "ple.algo", "ple.iterations", "ple.batch_size", "ple.lr", "ple.tau0", "ple.alpha",
                "ple.decay", "ple.rank_loss", "ple.weighting", "ple.rank_sft_coef", "ple.length_normalize", "ple.beta",
                "ple.raft_samples", "ple.grad_accum", "ple.warmup_steps", "ple.schedule", "ple.max_nonfinite_steps",
                "ple.max_empty_batches", "rollout.", "eval.", "run.out_dir", "run.resume", "run.progress",
                "run.sample_every", "run.plots", "run.tensorboard", "run.wandb_project")
CELL_DEFAULTS = ("run.progress=false", "run.plots=false")    # cells log plain lines to their train.log
# (metric, column, scale, format): the table's columns, where the runs report them
METRICS = (("mean_reward", "mean reward", 1, "{:+.3f}"), ("win_rate_vs_sft", "win rate vs SFT", 100, "{:.1f}%"),
           ("refusal_rate_harmful", "refusal, harmful", 100, "{:.1f}%"),
           ("helpfulness_benign", "helpfulness, benign", 1, "{:.3f}"),
           ("over_refusal_benign", "refusal, benign", 100, "{:.1f}%"), ("perplexity", "perplexity", 1, "{:.3f}"),
           ("kl_vs_sft", "KL(SFT ‖ π)", 1, "{:.2f}"), ("mean_response_tokens", "length", 1, "{:.1f}"))


@dataclasses.dataclass
class Axis:
    key: str
    labels: list[str]
    values: list[Any]


@dataclasses.dataclass
class Grid:
    title: str
    axes: list[Axis]
    seeds: int = 1
    settings: dict = dataclasses.field(default_factory=dict)     # key -> value for every cell
    plot_metrics: tuple = ("mean_reward", "refusal_rate_harmful", "helpfulness_benign")


@dataclasses.dataclass
class Cell:
    name: str
    labels: dict          # axis key -> label
    seed: int
    config: Config

    @property
    def warmup_key(self) -> str:
        kept = {k: v for k, _, v in leaves(self.config) if not k.startswith(AFTER_WARMUP)}
        return hashlib.sha1(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:12]


def parse_axis(text: str) -> Axis:
    """'ple.tau0=0.1,0.2' -> an axis; each value is read as YAML (numbers, true, null)."""
    key, _, raw = text.partition("=")
    if not key or not raw:
        raise ConfigError(f"--grid {text!r}: expected key=value[,value...], e.g. ple.algo=ple,raft")
    labels = [part.strip() for part in raw.split(",")]
    return Axis(key.strip(), labels, [parse_override(f"{key}={label}")[1] for label in labels])


def load_grid(name: str) -> Grid:
    """A grid YAML file, or the name of one shipped in ple_fast/sweeps: title, seeds, settings, grid."""
    path = Path(name)
    if not path.is_file():
        path = SHIPPED / f"{Path(name).name.removesuffix('.yaml')}.yaml"
        if not path.is_file():
            shipped = ", ".join(sorted(p.stem for p in SHIPPED.glob("*.yaml")))
            raise ConfigError(f"grid file {name!r} does not exist (shipped grids: {shipped})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {getattr(err, 'problem', err)}") from None
    unknown = set(data) - {"title", "seeds", "settings", "grid", "plot_metrics"}
    if unknown or not isinstance(data.get("grid"), dict):
        raise ConfigError(f"{path}: expected the keys title, seeds, settings, grid (a mapping of key -> values)"
                          + (f"; unknown: {', '.join(sorted(unknown))}" if unknown else ""))
    axes = []
    for key, values in data["grid"].items():
        if isinstance(values, dict):      # label -> value, e.g. named principles
            axes.append(Axis(key, [str(k) for k in values], list(values.values())))
        elif isinstance(values, list) and values:
            axes.append(Axis(key, [str(v) for v in values], values))
        else:
            raise ConfigError(f"{path}: grid.{key}: expected a list of values or a mapping label -> value")
    grid = Grid(str(data.get("title", path.stem)), axes, int(data.get("seeds", 1)), dict(data.get("settings") or {}))
    if data.get("plot_metrics"):
        grid.plot_metrics = tuple(data["plot_metrics"])
    return grid


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-")[:24] or "empty"


def plan_cells(grid: Grid, config_path: str | None, overrides: list[str], out: Path) -> list[Cell]:
    """Every cell's checked config; a bad key or value in any cell fails here, before anything runs."""
    base = build_config(config_path, [*CELL_DEFAULTS, *overrides])
    cells = []
    for combo in itertools.product(*(range(len(a.labels)) for a in grid.axes)):
        labels = {a.key: a.labels[i] for a, i in zip(grid.axes, combo)}
        stem = "_".join(f"{a.key.rsplit('.', 1)[-1]}-{_slug(a.labels[i])}" for a, i in zip(grid.axes, combo))
        for k in range(grid.seeds):
            seed = base.run.seed + k
            name = f"{stem or 'cell'}_seed-{seed}"
            values = {**grid.settings, **{a.key: a.values[i] for a, i in zip(grid.axes, combo)},
                      "run.seed": seed, "run.out_dir": str(out / "cells" / name)}
            config = build_config(config_path, [*CELL_DEFAULTS, *overrides], values=values,
                                  source=f"grid cell {name}")
            cells.append(Cell(name, labels, seed, config))
    return cells


# ---- running -----------------------------------------------------------------------------------------

def _warmup_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint a run wrote at the end of its warm-up (phase eval_before), if it is still there."""
    for state in sorted((run_dir / "checkpoints").glob("step-*/trainer_state.json")):
        if json.loads(state.read_text()).get("phase") == "eval_before":
            return state.parent
    return None


def export_warmup(run_dir: Path, dest: Path) -> bool:
    """Keep a run's end-of-warm-up checkpoint (hard links where the disk allows) and its metrics lines."""
    source = _warmup_checkpoint(run_dir)
    if source is None:
        return False
    temp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(temp, ignore_errors=True)

    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    shutil.copytree(source, temp / "checkpoint", copy_function=link)
    lines = json.loads((source / "trainer_state.json").read_text()).get("metrics_lines", 0)
    metrics = (run_dir / "metrics.jsonl").read_text().splitlines()[:lines]
    (temp / "metrics.jsonl").write_text("".join(line + "\n" for line in metrics))
    shutil.rmtree(dest, ignore_errors=True)
    temp.rename(dest)
    return True


def _same_cell(cell: Cell) -> bool | None:
    """Whether the cell's folder holds a run of this cell's config (None: no folder yet)."""
    folder = Path(cell.config.run.out_dir)
    if not folder.exists() or not any(folder.iterdir()):
        return None
    try:
        saved = json.loads((folder / "cell.json").read_text())["config"]
    except (OSError, ValueError, KeyError):
        return False
    return saved == to_dict(cell.config)


def check_folders(cells: list[Cell]) -> None:
    """A cell folder left by a different grid or config is an error, not something to overwrite."""
    for cell in cells:
        if _same_cell(cell) is False:
            raise InputError(f"{cell.config.run.out_dir} holds a run that is not this cell's config; choose another "
                             f"--out, or remove that folder to rerun it")


def _finished(cell: Cell) -> bool:
    return bool(_same_cell(cell)) and (Path(cell.config.run.out_dir) / "summary.json").is_file()


def _start(cell: Cell, warmup: Path | None) -> Config:
    """The cell's config as it runs: resumed from its own checkpoint, or from its group's warm-up."""
    folder = Path(cell.config.run.out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cell.json").write_text(json.dumps({"labels": cell.labels, "seed": cell.seed,   # first: it claims
                                                  "config": to_dict(cell.config)}, indent=1))  # the folder
    config = dataclasses.replace(cell.config, run=dataclasses.replace(cell.config.run))
    if (folder / "checkpoints").is_dir() and any((folder / "checkpoints").glob("step-*")):
        config.run.resume = "auto"
    elif warmup is not None and (warmup / "checkpoint").is_dir():
        shutil.copyfile(warmup / "metrics.jsonl", folder / "metrics.jsonl")
        config.run.resume = str(warmup / "checkpoint")
    return config


def run_cell(config: Config, threads: int) -> str | None:
    """One cell in a worker process, its output to train.log; returns None, or the error's line.
    threads: torch's CPU threads where the config leaves them to the default (its share of the cores)."""
    from ple_fast.run import run_command      # torch loads in the workers only: --help and planning stay light
    if config.run.threads == 0:
        config.run.threads = threads
    log_path = Path(config.run.out_dir) / "train.log"
    with open(log_path, "a", buffering=1) as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        try:
            run_command(config)
            return None
        except BaseException as err:       # noqa: BLE001 - a cell's failure is reported, the sweep goes on
            traceback.print_exc()
            return f"{type(err).__name__}: {err}"


def run_sweep(cells: list[Cell], warmups: Path, jobs: int, threads: int, say=print) -> dict[str, str]:
    """Run the unfinished cells, `jobs` at a time; each warm-up group's first cell before the rest, unless
    `warmups` already holds the group's warm-up. Returns cell name -> error for the cells that failed."""
    groups: dict[str, list[Cell]] = {}
    for cell in cells:
        if not _finished(cell):
            groups.setdefault(cell.warmup_key, []).append(cell)
    todo = sum(map(len, groups.values()))
    say(f"[sweep] {len(cells)} cells, {len(cells) - todo} finished, {todo} to run in {len(groups)} warm-up groups; "
        f"{jobs} at a time, {threads} thread(s) each")
    failed: dict[str, str] = {}
    if not todo:
        return failed
    context = get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context) as pool:
        running = {}

        def submit(cell: Cell, key: str | None) -> None:
            warmup = warmups / key if key else None
            running[pool.submit(run_cell, _start(cell, warmup), threads)] = (cell, key is None)

        for key, members in groups.items():
            if (warmups / key).is_dir():
                for cell in members:
                    submit(cell, key)
            else:
                submit(members[0], None)       # the group's leader runs the warm-up
        done_count = 0
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                cell, leads = running.pop(future)
                error = future.result()
                done_count += 1
                say(f"[sweep] {done_count}/{todo} {cell.name}: " + (f"FAILED: {error}" if error else "done"))
                if error:
                    failed[cell.name] = error
                if leads:
                    key = cell.warmup_key
                    shared = error is None and export_warmup(Path(cell.config.run.out_dir), warmups / key)
                    for other in groups[key][1:]:
                        submit(other, key if shared else None)
                    groups[key] = groups[key][:1]
    return failed


# ---- the report ------------------------------------------------------------------------------------------

def collect(cells: list[Cell], failed: dict[str, str]) -> list[dict]:
    """A record per cell: its labels, seed, status, and the run's summary (metrics, per-iteration history)."""
    records = []
    for cell in cells:
        record = {"cell": cell.name, "labels": cell.labels, "seed": cell.seed}
        summary_path = Path(cell.config.run.out_dir) / "summary.json"
        if _finished(cell):
            summary = json.loads(summary_path.read_text())
            record.update(status="done", before=summary["before"], after=summary["after"],
                          iterations=[{k: it.get(k) for k in ("iteration", "tau", "ranked_share", "mean_reward",
                                                                "mean_reward_principled", "mean_delta")}
                                      for it in summary["iterations"]],
                          seconds=summary.get("seconds"))
        else:
            record.update(status="failed" if cell.name in failed else "missing", error=failed.get(cell.name))
        records.append(record)
    return records


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values (NaN, NaN without any)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(records: list[dict], axes: list[str]) -> list[dict]:
    """Per combination of axis labels: n seeds, and mean / std over seeds of each metric after (and the
    SFT start's reward) and of the ranked share per iteration."""
    rows: dict[tuple, dict] = {}
    for record in records:
        if record["status"] != "done":
            continue
        key = tuple(record["labels"][a] for a in axes)
        row = rows.setdefault(key, {"labels": dict(zip(axes, key)), "runs": []})
        row["runs"].append(record)
    out = []
    for row in rows.values():
        runs = row.pop("runs")
        row["seeds"] = len(runs)
        row["metrics"] = {m: _mean_std([r["after"].get(m) for r in runs]) for m, *_ in METRICS
                          if any(r["after"].get(m) is not None for r in runs)}
        row["sft_reward"] = _mean_std([r["before"].get("mean_reward") for r in runs])
        depth = max((len(r["iterations"]) for r in runs), default=0)
        row["ranked_share"] = [_mean_std([r["iterations"][i]["ranked_share"] for r in runs if len(r["iterations"]) > i])
                               for i in range(depth)]
        row["tau"] = [_mean_std([r["iterations"][i]["tau"] for r in runs if len(r["iterations"]) > i])
                      for i in range(depth)]
        out.append(row)
    return out


def _cell_text(stats: tuple[float, float], scale: float, fmt: str, seeds: int) -> str:
    mean, std = stats
    if math.isnan(mean):
        return "-"
    text = fmt.format(mean * scale)
    return text if seeds < 2 else f"{text} ± {fmt.format(std * scale).lstrip('+').rstrip('%')}"


def results_table(grid: Grid, rows: list[dict], command: str) -> str:
    axes = [a.key for a in grid.axes]
    shown = [m for m in METRICS if any(m[0] in row["metrics"] for row in rows)]
    seeds = sorted({row["seeds"] for row in rows})
    lines = [f"## {grid.title}", "",
             f"Mean ± standard deviation over {'/'.join(map(str, seeds)) or 0} seeds per row; held-out responses "
             f"generated without the principle. `python -m ple_fast.sweep {command}`", "",
             "| " + " | ".join(axes + ["SFT start reward"] + [m[1] for m in shown]) + " |",
             "|" + "---|" * (len(axes) + 1 + len(shown))]
    for row in rows:
        n = row["seeds"]
        cells = [row["labels"][a] for a in axes] + [_cell_text(row["sft_reward"], 1, "{:+.3f}", n)]
        cells += [_cell_text(row["metrics"].get(m, (math.nan, math.nan)), scale, fmt, n) for m, _, scale, fmt in shown]
        lines.append("| " + " | ".join(cells) + " |")
    ranked = [row for row in rows if any(not math.isnan(mean) for mean, _ in row["ranked_share"])]
    if ranked:
        depth = max(len(row["ranked_share"]) for row in ranked)
        lines += ["", "Share of pairs that took the ranking branch (delta > tau), per iteration; tau at its start:", "",
                  "| " + " | ".join(axes + [f"iter {i + 1}" for i in range(depth)]) + " |",
                  "|" + "---|" * (len(axes) + depth)]
        for row in ranked:
            cells = [row["labels"][a] for a in axes]
            for share, (tau, _) in zip(row["ranked_share"], row["tau"]):
                cells.append(f"{_cell_text(share, 1, '{:.2f}', row['seeds'])} (τ {tau:.3f})")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(grid: Grid, cells: list[Cell], failed: dict[str, str], out: Path, command: str) -> list[dict]:
    records = collect(cells, failed)
    with open(out / "sweep.jsonl", "w") as fh:
        for record in records:
            fh.write(json.dumps(record) + "\n")
    rows = summarize(records, [a.key for a in grid.axes])
    (out / "results.md").write_text(results_table(grid, rows, command))
    titles = {m: title for m, title, *_ in METRICS}
    if rows:
        plot_sweep(rows, [a.key for a in grid.axes] or ["seed"], [(m, titles.get(m, m)) for m in grid.plot_metrics],
                   out / "plots")
    return rows


def doc_markers(name: str) -> tuple[str, str]:
    return f"<!-- sweep {name}: generated, do not edit -->", f"<!-- end sweep {name} -->"


def check_doc(doc: Path, name: str) -> None:
    start, end = doc_markers(name)
    text = doc.read_text() if doc.is_file() else ""
    if start not in text or end not in text:
        raise InputError(f"--update-doc {doc}: needs the lines {start!r} and {end!r} around the place for the results")


def update_doc(doc: Path, name: str, out: Path) -> None:
    """Put the sweep's results.md and plots between the doc's markers for `name` (plots to <doc dir>/img/)."""
    start, end = doc_markers(name)
    text = doc.read_text()
    body = (out / "results.md").read_text().split("\n", 2)[2].strip()      # the doc has its own heading
    img = doc.parent / "img"
    for png in sorted((out / "plots").glob("*.png")):
        img.mkdir(exist_ok=True)
        shutil.copyfile(png, img / f"sweep-{name}-{png.name}")
        body += f"\n\n![{name}: {png.stem}](img/sweep-{name}-{png.name})"
    head, rest = text.split(start, 1)
    doc.write_text(f"{head}{start}\n{body}\n{end}{rest.split(end, 1)[1]}")


EXAMPLES = """Examples:
  python -m ple_fast.sweep --grid ple.algo=ple,raft,distill task.aligned_share=0.1,0.4 --seeds 3 --out runs/sw
  python -m ple_fast.sweep --grid-file difficulty --jobs 2 --out runs/difficulty     # a shipped grid
  python -m ple_fast.sweep --grid-file tau.yaml --out runs/tau ple.iterations=3      # overrides for every cell

Shipped grids (ple_fast/sweeps): {shipped}.
A grid file holds title, seeds, settings (key: value for every cell) and grid (key: [values], or
key: {{label: value}}). Cells sharing every key the warm-up reads share one warm-up. Rerunning a
command skips finished cells and resumes interrupted ones. docs/experiments.md: the shipped grids' results."""


def parse_args(argv):
    shipped = ", ".join(sorted(p.stem for p in SHIPPED.glob("*.yaml")))
    parser = argparse.ArgumentParser(prog="python -m ple_fast.sweep", formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="A grid of train configs x seeds, and a table of the results.",
                                     epilog=EXAMPLES.format(shipped=shipped))
    parser.add_argument("--grid", nargs="+", action="extend", default=[], metavar="KEY=V1,V2",
                        help="an axis of the grid (values split at commas); a single value applies to every cell")
    parser.add_argument("--grid-file", help="a grid YAML file, or a shipped grid's name")
    parser.add_argument("--seeds", type=int, help="seeds per cell: run.seed, run.seed + 1, ... (default 1, or the "
                                                  "grid file's)")
    parser.add_argument("--jobs", type=int, default=1, help="cells run at once, in worker processes (default 1)")
    parser.add_argument("--config", help="train's YAML config (or a shipped config's name) under every cell")
    parser.add_argument("--out", required=True, help="the sweep's folder")
    parser.add_argument("--warmups", metavar="DIR", help="where warm-ups are kept and reused, also across sweeps "
                                                         "(default OUT/warmups): a warm-up depends only on its config")
    parser.add_argument("--update-doc", metavar="FILE", help="also put the results and plots in FILE, between its "
                                                                 "markers for this grid (docs/experiments.md)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="train's config keys, for every cell")
    return parser.parse_intermixed_args(argv)


def main(argv=None) -> int:
    """Plan and check every cell, run what is left, write the report; exit 2 on bad input, 1 if a cell failed."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        grid = load_grid(args.grid_file) if args.grid_file else Grid("Sweep", [])
        extra = [parse_axis(text) for text in args.grid]
        grid.settings.update({a.key: a.values[0] for a in extra if len(a.values) == 1})
        grid.axes += [a for a in extra if len(a.values) > 1]
        if len({a.key for a in grid.axes}) < len(grid.axes):
            raise ConfigError("a key appears on two axes of the grid")
        grid.seeds = args.seeds if args.seeds is not None else grid.seeds
        if grid.seeds < 1 or args.jobs < 1:
            raise ConfigError("--seeds and --jobs must be at least 1")
        out = Path(args.out)
        cells = plan_cells(grid, args.config, args.overrides, out)
        check_folders(cells)
        name = Path(args.grid_file).stem if args.grid_file else "grid"
        if args.update_doc:
            check_doc(Path(args.update_doc), name)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    threads = cells[0].config.run.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    failed = run_sweep(cells, Path(args.warmups) if args.warmups else out / "warmups", args.jobs, threads)
    command = " ".join(sys.argv[1:] if argv is None else argv)
    rows = write_report(grid, cells, failed, out, command)
    print(f"[sweep] {len(rows)} rows; results in {out / 'results.md'}, records in {out / 'sweep.jsonl'}")
    if args.update_doc and not failed:
        update_doc(Path(args.update_doc), name, out)
        print(f"[sweep] {args.update_doc}: the {name} section updated")
    for name, error in failed.items():
        print(f"[sweep] {name} failed: {error} (log: {out / 'cells' / name / 'train.log'})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
