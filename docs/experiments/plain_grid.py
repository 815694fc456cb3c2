"""The plain-loop check of a controller change, as one grid: the 13 loops of `plain_tasks.py`, their lr lists, 3 seeds,
at 500 and 1000 steps (cosine and constant) and 2000 steps (cosine), `rl` and `off`; then the target counts, and the
run-by-run comparison of two grids (the kept controller's and a candidate's).

    python docs/experiments/plain_grid.py run OUT [--policies rl,off] [--lanes 2] [--tasks cnn,mf] [--probe no]
    python docs/experiments/plain_grid.py targets OUT
    python docs/experiments/plain_grid.py compare BASE NEW        # either may hold rl runs only: off from the other

`run` executes the README's snippet with the `controller.py` of the checkout this file is in (for a candidate, run it
from a `git worktree` of the change), one thread per run, `--lanes` runs at a time, and skips runs already in OUT
(OUT/STEPS_SCHEDULE/TASK_POLICY_LR_SEED.json, `plain_tasks.py`'s files). The full grid is 334 starts x 3 seeds:
1002 runs per policy, 15 minutes for both on 2 cores (2 lanes). `--probe no`: the snippet passes hypergradient=None
(the search by cooled trials alone, for loops that do not copy GradientProbe; use its own OUT).

`targets`, per job (loop, length, schedule): lr* = `off`'s best mean of the list, L* its mean; the good start fails
when `rl`'s mean at lr* is above `off`'s by more than 0.5%; a bad start (every other lr of the list) is within 2% when
`rl`'s mean is at most 1.02 L*. `compare`: `rl` runs lower or higher by over 1%, and both grids' target counts.
Not used by train.py or the tests.
"""

import functools
import glob
import json
import math
import multiprocessing
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import plain_tasks

SEEDS = (0, 1, 2)
# The lr lists: half decades (or wider) around each loop's best lr, from "Plain loops unlike the benchmark", "A sixth
# plain loop", "The plain loops at four run lengths", "Four loops the controller was not tuned on" and "Two held-out
# plain loops" in README.md here.
LRS = {
    "mlp_adam": (3.33e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
    "mlp_sgd": (1e-3, 3e-3, 0.03, 0.3, 0.9),
    "lstm": (1e-3, 3e-3, 0.03, 0.3, 0.9),
    "tfm": (1e-3, 3e-3, 3e-2, 0.3, 1.0),
    "reg_adam": (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0),
    "reg_sgd": (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0),
    "reg_ovf": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
    "cnn": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3),
    "linreg": (1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0),
    "relu_reg": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3),
    "ae": (3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0),
    "spiral": (0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
    "mf": (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0),
}
SEQUENCE_LOOPS = ("lstm", "tfm")  # the slowest; their 1000- and 2000-step figures are in the sections
LONG_LOOPS = ("mlp_adam", "mlp_sgd", "reg_adam", "reg_sgd", "reg_ovf", "relu_reg")
JOBS = (
    [(t, 500, "cosine", LRS[t]) for t in plain_tasks.TASKS]
    + [(t, 500, "constant", LRS[t]) for t in plain_tasks.TASKS if t not in SEQUENCE_LOOPS]
    + [(t, 1000, "cosine", LRS[t]) for t in plain_tasks.TASKS if t not in SEQUENCE_LOOPS]
    + [(t, 1000, "constant", LRS[t]) for t in plain_tasks.TASKS if t not in SEQUENCE_LOOPS]
    + [(t, 2000, "cosine", (3e-4, 1e-3, 3e-3) if t == "reg_ovf" else LRS[t]) for t in LONG_LOOPS]
)


def one(args, probe=True):
    out, task, steps, schedule, policy, lr, seed = args
    done = plain_tasks.save(
        os.path.join(out, f"{steps}_{schedule}"), task, lr, policy, seed, steps, schedule, probe=probe
    )
    if done:
        print(steps, schedule, task, policy, f"{lr:g}", seed, round(done[0], 5), round(done[1], 3), flush=True)


def init_worker():
    import torch

    torch.set_num_threads(1)


def load(out):
    """{(task, steps, schedule): {policy: {lr: {seed: loss}}}}; a non-finite loss counts as inf."""
    grid = {}
    for f in glob.glob(os.path.join(out, "*_*", "*.json")):
        steps, schedule = os.path.basename(os.path.dirname(f)).split("_")
        with open(f) as fh:
            r = json.load(fh)
        loss = r["loss"] if math.isfinite(r["loss"]) else math.inf
        cell = grid.setdefault((r["task"], int(steps), schedule), {}).setdefault(r["policy"], {})
        cell.setdefault(r["lr"], {})[r["seed"]] = loss
    return grid


def mean(by_seed):
    return statistics.mean(by_seed[s] for s in SEEDS) if all(s in by_seed for s in SEEDS) else None


def targets(grid, label=""):
    """Per length and schedule: good starts that fail / jobs with a sweep; bad starts within 2% / bad starts."""
    rows, totals = [], {}
    for (task, steps, schedule), cell in sorted(grid.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        off, rl = ({lr: mean(v) for lr, v in cell.get(p, {}).items()} for p in ("off", "rl"))
        off = {lr: m for lr, m in off.items() if m is not None}
        if not off or not rl:
            continue
        best = min(off, key=off.get)
        L = off[best]
        t = totals.setdefault((steps, schedule), [0, 0, 0, 0])
        if rl.get(best) is not None:
            gap = rl[best] / L - 1 if L > 0 else 0.0
            t[0] += gap > 0.005
            t[1] += 1
            rows.append(f"{steps} {schedule} {task}: lr* {best:g} L* {L:.4g}, good start rl {100 * gap:+.1f}% vs off")
        for lr, m in rl.items():
            if lr != best and m is not None:
                t[2] += m <= 1.02 * L
                t[3] += 1
    for r in rows:
        print(label + r)
    for (steps, schedule), (fail, jobs, within, bad) in sorted(totals.items()):
        print(f"{label}{steps} {schedule}: good start fails {fail} / {jobs}; bad starts within 2%: {within} / {bad}")


def compare(base, new):
    lower, higher, same = [], [], 0
    for key, cell in new.items():
        for lr, v in cell.get("rl", {}).items():
            for s, loss in v.items():
                b = base.get(key, {}).get("rl", {}).get(lr, {}).get(s)
                if b is None:
                    continue
                if loss == b:
                    d = 0.0
                elif not math.isfinite(b):  # a non-finite base (load() reads it as inf): any finite loss is lower
                    d = -math.inf
                elif b == 0:  # a base of exactly 0: any other loss is higher
                    d = math.inf
                else:
                    d = (loss - b) / b
                if d < -0.01:
                    lower.append((d, key, lr, s, b, loss))
                elif d > 0.01:
                    higher.append((d, key, lr, s, b, loss))
                else:
                    same += 1
    print(f"rl runs: {len(lower)} lower by over 1%, {len(higher)} higher, {same} within 1%")
    for d, (task, steps, schedule), lr, s, b, loss in sorted(lower) + sorted(higher, reverse=True):
        print(f"  {steps} {schedule} {task} {lr:g} s{s}: {b:.4g} -> {loss:.4g} ({100 * d:+.1f}%)")
    for a, b in ((base, new), (new, base)):  # either grid's off runs serve both (a candidate's grid may hold rl only)
        for key, cell in a.items():
            if cell.get("off"):
                b.setdefault(key, {}).setdefault("off", cell["off"])
    targets(base, "base ")
    targets(new, "new  ")


if __name__ == "__main__":
    cmd, args = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("", [])
    if cmd == "run" and args:
        opts = dict(zip(args[1::2], args[2::2]))
        unknown = set(opts) - {"--policies", "--lanes", "--tasks", "--probe"}
        if unknown or len(args) % 2 == 0:
            got = " ".join(args[1:])
            sys.exit(f"plain_grid.py: error: run OUT takes --policies, --lanes, --tasks, --probe (got {got})")
        probe = opts.get("--probe", "yes")
        if probe not in ("yes", "no"):
            sys.exit(f"plain_grid.py: error: --probe must be yes or no (no: hypergradient=None), got {probe!r}")
        tasks = opts.get("--tasks", ",".join(plain_tasks.TASKS)).split(",")
        bad = [t for t in tasks if t not in plain_tasks.TASKS]
        if bad:
            sys.exit(f"plain_grid.py: error: --tasks must name loops of {', '.join(plain_tasks.TASKS)}, got {bad[0]!r}")
        policies = opts.get("--policies", "rl,off").split(",")
        if not set(policies) <= set(plain_tasks.POLICIES):
            known = ", ".join(plain_tasks.POLICIES)
            sys.exit(f"plain_grid.py: error: --policies must be among {known}, got {','.join(policies)!r}")
        lanes = opts.get("--lanes", "2")
        if not lanes.isdigit() or int(lanes) < 1:
            sys.exit(f"plain_grid.py: error: --lanes must be a whole number >= 1, got {lanes!r}")
        units = [
            (args[0], t, steps, sched, pol, lr, s)
            for t, steps, sched, lrs in JOBS
            if t in tasks
            for lr in lrs
            for s in SEEDS
            for pol in policies
        ]
        with multiprocessing.Pool(int(lanes), initializer=init_worker) as pool:
            for _ in pool.imap_unordered(functools.partial(one, probe=probe == "yes"), units):
                pass
    elif cmd == "targets" and len(args) == 1:
        targets(load(args[0]))
    elif cmd == "compare" and len(args) == 2:
        compare(load(args[0]), load(args[1]))
    else:
        sys.exit(
            "usage: plain_grid.py run OUT [--policies P] [--lanes N] [--tasks T] [--probe yes|no] | targets OUT | "
            "compare BASE NEW"
        )
