"""A longer-horizon reading than the hypergradient, measured on the plain loops (a lab measurement, not used by the
controller): over a window, h = sum g_t.u_{t-1} / sqrt(sum |g_t|^2 sum |u_{t-1}|^2) (GradientProbe's) and hD, the same
with the displacement since the window's start, w_t - w_s, for u_{t-1} (lags 1..n: a step that oscillates cancels out
of the displacement, a slow direction adds up). `off` runs, cosine; windows = the second halves of the 20-step
segments 1, 5 and 13 (steps 10-19, 90-99, 250-259); the mean over the seeds.

    python docs/experiments/displacement_probe.py TASK STEPS LRS SEEDS
    python docs/experiments/displacement_probe.py linreg 500 0.1,1,3 0,1,2
"""

import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import plain_tasks

WINDOWS = [(10, 20), (90, 100), (250, 260)]


def readings(task, lr, seed, steps):
    """[(window start, h, hD)] for one `off` run of the plain loop."""
    model, opt, batch, _, loss_fn, _ = plain_tasks.make(task, seed)
    params, schedule = list(model.parameters()), plain_tasks.schedule_fn("cosine", steps)
    out, prev, anchor, sums = [], None, None, None
    for t in range(min(steps, WINDOWS[-1][1])):
        for g in opt.param_groups:
            g["lr"] = lr * schedule(t / steps)
        loss = loss_fn(*batch(t))
        opt.zero_grad()
        loss.backward()
        w = torch.cat([p.detach().reshape(-1) for p in params]).double()
        g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]).double()
        for a, b in WINDOWS:
            if t == a:
                anchor, sums = prev, [0.0] * 5  # g.u, |g|^2, |u|^2, g.D, |D|^2
            if a <= t < b and prev is not None:
                u, d = w - prev, w - anchor
                sums = [s + float(x) for s, x in zip(sums, (g @ u, g @ g, u @ u, g @ d, d @ d))]
            if t == b - 1 and sums[1] > 0 and sums[2] > 0:
                out.append((a, sums[0] / math.sqrt(sums[1] * sums[2]), sums[3] / math.sqrt(sums[1] * sums[4])))
        if torch.isfinite(g).all():
            opt.step()
        prev = w
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    task, steps = sys.argv[1], int(sys.argv[2])
    for lr in map(float, sys.argv[3].split(",")):
        runs = [readings(task, lr, int(s), steps) for s in sys.argv[4].split(",")]
        cells = []
        for i, (a, _, _) in enumerate(runs[0]):
            h = sum(r[i][1] for r in runs if len(r) > i) / len(runs)
            hd = sum(r[i][2] for r in runs if len(r) > i) / len(runs)
            cells.append(f"steps {a}-{a + 9}: h {h:+.3f} hD {hd:+.3f}")
        print(task, f"{lr:g}", " | ".join(cells), flush=True)
