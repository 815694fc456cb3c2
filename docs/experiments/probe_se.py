"""The hypergradient's standard error, for the significance gate tried in docs/experiments/README.md ("A suspicion
needs a significant reading"). A lab patch, not used by train.py or the tests.

GradientProbe.read() here returns h as a float that also carries `.se`, the standard error of the per-step cosines
g_t.u_{t-1} / (|g_t| |u_{t-1}|) over the window (their sample sd / sqrt(n)), and `.t`, their mean over it. Steps are
told apart by a parameter seen twice (DeepSpeed steps each param group on its own). With the controller patched (`git
apply docs/experiments/significance_gate.patch`), a reading of "too high" counts only where t > SIG_T. Runs the plain
loops or train.py with the patch on:

    python docs/experiments/probe_se.py plain TASK STEPS LRS SEEDS POLICIES OUT_DIR [SCHEDULE]   # as plain_tasks.py
    python docs/experiments/probe_se.py train [train.py flags]                                   # one process
"""

import math
import os
import runpy
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import train


class Reading(float):
    se = None  # the per-step cosines' standard error
    t = None  # their mean over it


_pre, _start, _read = train.GradientProbe._pre, train.GradientProbe.start, train.GradientProbe.read


def pre(self, optimizer, args, kwargs):
    if not self.active:
        return _pre(self, optimizer, args, kwargs)
    ids = {id(p) for g in optimizer.param_groups for p in g["params"] if p.grad is not None}
    if ids & self.seen:  # a new step
        self.steps.append(self.current)
        self.current, self.seen = [0.0] * 5, set()
    self.seen |= ids
    before = self.sums.cpu().clone()
    _pre(self, optimizer, args, kwargs)
    self.current = [a + b for a, b in zip(self.current, (self.sums.cpu() - before).tolist())]


def start(self):
    _start(self)
    self.steps, self.current, self.seen = [], [0.0] * 5, set()


def read(self, accelerator=None):
    steps = getattr(self, "steps", []) + [getattr(self, "current", [0.0] * 5)]
    h, alignment = _read(self, accelerator)
    if h is None:
        return h, alignment
    cosines = [gu / math.sqrt(gg * uu) for gu, _, gg, uu, _ in steps if gg > 0 and uu > 0]
    h = Reading(h)
    if len(cosines) > 2:
        h.se = statistics.stdev(cosines) / math.sqrt(len(cosines))
        h.t = statistics.mean(cosines) / h.se if h.se > 0 else 0.0
    return h, alignment


train.GradientProbe._pre, train.GradientProbe.start, train.GradientProbe.read = pre, start, read

if __name__ == "__main__":
    mode, sys.argv = sys.argv[1], [sys.argv[0], *sys.argv[2:]]
    if mode == "train":
        train.main(sys.argv[1:])
    else:
        runpy.run_path(os.path.join(ROOT, "docs", "experiments", "plain_tasks.py"), run_name="__main__")
