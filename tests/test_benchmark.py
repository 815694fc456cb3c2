"""benchmark.py --quick end to end: the sweep, the good and a bad start, rl (both search budgets), two peers,
the table with seeds and paired differences, and the plots.

Run: python -m pytest -q tests/test_benchmark.py      (about 3-5 minutes on 2 CPU cores)
"""

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT


def bench(out):
    p = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmark.py"), "--quick", "--output_dir", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p.stdout


def test_quick_benchmark_writes_table_and_plots(tmp_path):
    out = tmp_path / "bench"
    bench(out)
    table = (out / "results.md").read_text()
    for method in ("| oracle (best of sweep) |", "| rl |", "| rl (1.00x) |", "| constant |", "| prodigy |"):
        assert method in table, table
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lr_star"] in (3e-3, 3e-2) and len(summary["sweep"]) == 2
    rows = {(r["method"], r["start"]): r for r in summary["rows"]}
    good = next(r for (m, s), r in rows.items() if m == "rl" and "(1x)" in s)
    assert len(good["eval_loss"]) == 2 and len(good["paired_pct"]) == 2  # two seeds, each paired with the oracle
    assert all(r["cost"] <= 1.5 + 1e-9 for r in summary["rows"])  # --quick's search budget is 0.5
    assert all(r["cost"] == 1.0 for (m, _), r in rows.items() if m == "rl (1.00x)")
    for png in ("eval_loss.png", "controller_trajectories.png"):
        assert (out / png).stat().st_size > 1000
    # every run went through train.py and wrote its own files
    assert any((out / d / "metrics.jsonl").exists() for d in os.listdir(out) if d.startswith("rl_"))

    # a second invocation reuses the finished runs; an rl run whose logged decisions this controller would not take
    # (as after a change to controller.py) runs again, and only that one
    victim = min(d for d in os.listdir(out) if d.startswith("rl_") and (out / d / "results.json").exists())
    rows = [json.loads(line) for line in (out / victim / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if "controller/action" in r)
    first["controller/action"] = "an earlier controller's decision"
    (out / victim / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    again = [line.split()[0] for line in bench(out).splitlines() if "eval_loss" in line and line.startswith("  ")]
    assert again == [victim], again
    assert "an earlier" not in (out / victim / "metrics.jsonl").read_text()


def test_overhead_measures_a_runs_checkpoints_once_then_deletes_them(tmp_path):
    """The overhead runs' step_N checkpoints are measured (a hard link counted once) and deleted; a reused run's
    measurement is read back; a run written again is measured again."""
    sys.path.insert(0, ROOT)
    import benchmark

    run = tmp_path / "overhead_25M_rl_0"
    for step, size in ((10, 300), (20, 500)):
        (run / f"step_{step}" / "controller_slots").mkdir(parents=True)
        (run / f"step_{step}" / "model.bin").write_bytes(b"x" * size)
    os.link(run / "step_10" / "model.bin", run / "step_20" / "controller_slots" / "init.bin")
    assert benchmark.measured_checkpoints(str(run)) == {10: 300, 20: 500}
    assert not any(n.startswith("step_") for n in os.listdir(run))
    assert benchmark.measured_checkpoints(str(run)) == {10: 300, 20: 500}  # reused
    (run / "step_10").mkdir()
    (run / "step_10" / "model.bin").write_bytes(b"x" * 7)
    assert benchmark.measured_checkpoints(str(run)) == {10: 7}


BAD = [["--overhead", "--repeats", "0"], ["--seeds", "0"], ["--threads", "-1"], ["--task", "x"]]


@pytest.mark.parametrize("flags", BAD)
def test_bad_flags_are_refused_in_one_line_before_anything_is_written(tmp_path, flags):
    out = tmp_path / "bench"
    cmd = [sys.executable, os.path.join(ROOT, "benchmark.py"), "--output_dir", str(out), *flags]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode != 0 and p.stderr.startswith("benchmark.py: error: ") and flags[-2] in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert not out.exists()
