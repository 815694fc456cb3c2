"""benchmark.py --quick end to end: the sweep, the good and a bad start, rl (both search budgets), two peers,
the table with seeds and paired differences, and the plots.

Run: python -m pytest -q tests/test_benchmark.py      (about 3 minutes on 2 CPU cores)
"""

import json
import os
import subprocess
import sys

from helpers import ROOT


def test_quick_benchmark_writes_table_and_plots(tmp_path):
    out = tmp_path / "bench"
    p = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmark.py"), "--quick", "--output_dir", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
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
    # every run went through accelerate launch train.py and wrote its own files
    assert any((out / d / "metrics.jsonl").exists() for d in os.listdir(out) if d.startswith("rl_"))
