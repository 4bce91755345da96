"""python -m ple_fast.sweep: grids, shared warm-ups that change nothing, resume, the report."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ple_fast import sweep
from ple_fast.config import Config, ConfigError, InputError, build_config, leaves

TINY = ["sft.steps=6", "sft.batch_size=8", "ple.iterations=1", "ple.batch_size=32", "eval.samples=1",
        "eval.max_queries=6", "rollout.max_new_tokens=8", "eval.max_new_tokens=8", "model.hidden_size=32",
        "model.layers=1", "run.threads=1"]


def weights(folder: Path) -> dict:
    return load_file(str(next((folder / "model").glob("*.safetensors"))))


def test_after_warmup_keys_are_config_keys():
    """A mistyped entry would silently let cells share a warm-up they must not share, or never share."""
    keys = [key for key, _, _ in leaves(Config())]
    sections = {key.split(".")[0] + "." for key in keys}
    for entry in sweep.AFTER_WARMUP:
        assert entry in keys or entry in sections, entry


def test_warmup_groups_split_on_what_the_warmup_reads(tmp_path):
    grid = sweep.Grid("t", [sweep.parse_axis("ple.tau0=0.1,0.5"), sweep.parse_axis("sft.lr=0.001,0.002")])
    cells = sweep.plan_cells(grid, None, [], tmp_path)
    assert len(cells) == 4
    by_lr = {}
    for cell in cells:
        by_lr.setdefault(cell.config.sft.lr, set()).add(cell.warmup_key)
    assert all(len(keys) == 1 for keys in by_lr.values()) and len(set.union(*by_lr.values())) == 2
    assert [c.config.ple.tau0 for c in cells] == [0.1, 0.1, 0.5, 0.5]
    assert len({c.config.run.out_dir for c in cells}) == 4


def test_parse_axis_reads_yaml_scalars():
    axis = sweep.parse_axis("ple.tau0=0,0.5, 1.0e-1")
    assert axis.values == [0, 0.5, 0.1] and axis.labels == ["0", "0.5", "1.0e-1"]
    assert sweep.parse_axis("ple.length_normalize=true,false").values == [True, False]
    with pytest.raises(ConfigError):
        sweep.parse_axis("ple.tau0")


@pytest.mark.parametrize("name", sorted(p.stem for p in sweep.SHIPPED.glob("*.yaml")))
def test_shipped_grids_plan(name, tmp_path):
    grid = sweep.load_grid(name)
    cells = sweep.plan_cells(grid, None, [], tmp_path)
    assert len(cells) == grid.seeds * math.prod(len(a.labels) for a in grid.axes) and grid.seeds >= 3
    assert len({c.name for c in cells}) == len(cells)


def test_shipped_grids_cover_the_issue():
    names = {p.stem for p in sweep.SHIPPED.glob("*.yaml")}
    assert {"difficulty", "tau", "weighting", "principle"} <= names
    assert {a.key for a in sweep.load_grid("tau").axes} == {"ple.tau0", "ple.alpha", "ple.decay"}
    axes = {a.key: a for a in sweep.load_grid("principle").axes}
    assert set(axes["principle"].labels) == {"task", "empty", "generic", "misleading"}
    assert axes["principle"].values[:2] == [None, ""]


def test_summarize_means_and_sample_std():
    records = [{"status": "done", "labels": {"k": "a"}, "seed": s,
                "before": {"mean_reward": 0.0}, "after": {"mean_reward": r},
                "iterations": [{"ranked_share": r, "tau": 0.2}]} for s, r in enumerate([1.0, 2.0, 4.0])]
    records.append({"status": "failed", "labels": {"k": "a"}, "seed": 3})
    (row,) = sweep.summarize(records, ["k"])
    mean, std = row["metrics"]["mean_reward"]
    assert row["seeds"] == 3 and mean == pytest.approx(7 / 3)
    assert std == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    assert row["ranked_share"][0][0] == pytest.approx(7 / 3)
    records[0]["after"]["mean_reward"] = float("nan")        # a NaN is left out, never averaged in
    (row,) = sweep.summarize(records, ["k"])
    assert row["metrics"]["mean_reward"][0] == pytest.approx(3.0)


def test_bad_grid_fails_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "sw"
    assert sweep.main(["--grid", "ple.tau=0.1,0.2", "--out", str(out)]) == 2
    assert "ple.tau0" in capsys.readouterr().err and not out.exists()
    assert sweep.main(["--grid", "ple.algo=ple,nope", "--out", str(out)]) == 2
    assert sweep.main(["--grid-file", "missing", "--out", str(out)]) == 2
    assert "shipped grids" in capsys.readouterr().err and not out.exists()


def test_a_foreign_cell_folder_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "sw"
    folder = out / "cells" / "algo-ple_seed-0"
    folder.mkdir(parents=True)
    (folder / "keep.txt").write_text("mine")
    assert sweep.main(["--grid", "ple.algo=ple,raft", "--out", str(out)]) == 2
    assert "not this cell's config" in capsys.readouterr().err
    assert (folder / "keep.txt").read_text() == "mine"


def test_sweep_runs_a_small_grid_and_a_shared_warmup_changes_nothing(tmp_path):
    """Two cells, one seed: the second resumes from the first's warm-up and ends where a fresh run with
    its config ends, bit for bit; a second invocation reruns nothing."""
    out = tmp_path / "sw"
    args = ["--grid", "ple.algo=ple,raft", "--out", str(out), *TINY]
    assert sweep.main(args) == 0
    records = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["done", "done"]
    assert [r["labels"]["ple.algo"] for r in records] == ["ple", "raft"]
    table = (out / "results.md").read_text()
    assert "| ple |" in table and "| raft |" in table and "ranking branch" in table
    assert len(list((out / "warmups").iterdir())) == 1
    raft_dir = out / "cells" / "algo-raft_seed-0"
    assert "resumed from" in (raft_dir / "train.log").read_text()

    fresh = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "ple_fast.train", "--algo", "raft", "--out", str(fresh), *TINY,
                    "run.progress=false", "run.plots=false"], check=True, capture_output=True)
    mine, theirs = weights(raft_dir), weights(fresh)
    assert all((mine[k] == theirs[k]).all() for k in theirs)
    assert (raft_dir / "samples.jsonl").read_text() == (fresh / "samples.jsonl").read_text()
    strip = lambda text: [{k: v for k, v in json.loads(line).items() if "per_s" not in k and "seconds" not in k}
                          for line in text.splitlines()]
    assert strip((raft_dir / "metrics.jsonl").read_text()) == strip((fresh / "metrics.jsonl").read_text())

    stamp = (raft_dir / "summary.json").stat().st_mtime_ns
    assert sweep.main(args) == 0
    assert (raft_dir / "summary.json").stat().st_mtime_ns == stamp
    assert [json.loads(line)["status"] for line in (out / "sweep.jsonl").read_text().splitlines()] == ["done", "done"]

    # a cell killed before its summary resumes from its own newest checkpoint, and ends the same
    (raft_dir / "summary.json").unlink()
    assert sweep.main(args) == 0
    assert f"resumed from {raft_dir / 'checkpoints'}" in (raft_dir / "train.log").read_text()
    mine = weights(raft_dir)
    assert all((mine[k] == theirs[k]).all() for k in theirs) and (raft_dir / "summary.json").is_file()
    assert (out / "results.md").read_text() == table


def test_warmup_end_checkpoint_and_a_new_threshold_on_resume(tmp_path):
    """A run checkpoints at the end of its warm-up; resumed from there with another tau0, alignment starts
    from that tau0, not the saved one."""
    from ple_fast.run import run_command
    first = run_command(build_config(None, [*TINY, "ple.tau0=0.1", f"run.out_dir={tmp_path / 'a'}",
                                            "run.progress=false", "run.plots=false"]))
    warm = sweep._warmup_checkpoint(tmp_path / "a")
    assert warm is not None and json.loads((warm / "trainer_state.json").read_text())["sft_step"] == 6
    assert first["iterations"][0]["tau"] == pytest.approx(0.1)
    second = run_command(build_config(None, [*TINY, "ple.tau0=0.7", f"run.out_dir={tmp_path / 'b'}",
                                             f"run.resume={warm}", "run.progress=false", "run.plots=false"]))
    assert second["iterations"][0]["tau"] == pytest.approx(0.7)


def test_update_doc_replaces_only_its_section(tmp_path):
    out = tmp_path / "sw"
    (out / "plots").mkdir(parents=True)
    (out / "results.md").write_text("## title\n\n| a |\n|---|\n| 1 |\n")
    (out / "plots" / "metrics.png").write_bytes(b"png")
    doc = tmp_path / "docs" / "experiments.md"
    doc.parent.mkdir()
    start, end = sweep.doc_markers("difficulty")
    other = sweep.doc_markers("tau")
    doc.write_text(f"# E\n\nreading\n{start}\nold table\n{end}\nmore\n{other[0]}\nkeep\n{other[1]}\n")
    sweep.check_doc(doc, "difficulty")
    with pytest.raises(InputError, match="needs the lines"):
        sweep.check_doc(doc, "weighting")
    sweep.update_doc(doc, "difficulty", out)
    text = doc.read_text()
    assert "old table" not in text and "| 1 |" in text and "keep" in text and text.startswith("# E\n\nreading\n")
    assert "(img/sweep-difficulty-metrics.png)" in text and (doc.parent / "img" / "sweep-difficulty-metrics.png").is_file()
    sweep.update_doc(doc, "difficulty", out)
    assert doc.read_text() == text
