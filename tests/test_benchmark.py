"""benchmark.py --quick end to end: the sweep, a bad start, the controller and a peer, the table and the plots.

Run: python -m pytest -q tests/test_benchmark.py      (about 2 minutes on 2 CPU cores)
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
    for method in ("oracle (best of sweep)", "| constant |", "| rl |", "| prodigy |"):
        assert method in table
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lr_star"] in (3e-3, 3e-2) and len(summary["sweep"]) == 2
    rl = next(r for r in summary["rows"] if r["method"] == "rl")
    assert len(rl["eval_loss"]) == 1 and rl["eval_loss"][0] < 5.9  # it trained (ln 384 = 5.95 at init)
    for png in ("eval_loss.png", "controller_trajectories.png"):
        assert (out / png).stat().st_size > 1000
    # every run went through accelerate launch train.py and wrote its own files
    assert any((out / d / "metrics.jsonl").exists() for d in os.listdir(out) if d.startswith("rl_"))
