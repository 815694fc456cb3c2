"""The hypergradient of the training gradient (what GradientProbe reads) beside that of the validation gradient, on a
plain loop of plain_tasks.py at a fixed base lr (its warmup + cosine, no controller): per 20-step window, the cosine of
sum g.u_{t-1} with g the batch's gradient, and with g the gradient of the whole validation set at the same weights.

    python docs/experiments/val_hypergradient.py mlp_sgd 0.003 2000 0

Not used by train.py or the tests (one extra forward and backward on the validation set per step).
"""

import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import plain_tasks

task, lr, steps, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)
model, opt, batch, evaluate, loss_fn, _ = plain_tasks.make(task, seed)
closure = dict(zip(evaluate.__code__.co_freevars, (c.cell_contents for c in evaluate.__closure__)))
xv, yv = closure["xv"], closure["yv"]  # the validation set evaluate() uses
params = list(model.parameters())
schedule = plain_tasks.schedule_fn("cosine", steps)  # plain_tasks.run's: 3% warmup + cosine


def flat_grad():
    return torch.cat([p.grad.reshape(-1) for p in params]).clone()


before, sums = None, [0.0] * 5  # g_train.u, g_val.u, |g_train|^2, |g_val|^2, |u|^2
for t in range(steps):
    for g in opt.param_groups:
        g["lr"] = lr * schedule(t / steps)
    w = torch.cat([p.detach().reshape(-1) for p in params]).clone()
    model.zero_grad()
    loss_fn(model(xv), yv).backward()
    g_val = flat_grad()
    opt.zero_grad()
    loss_fn(*batch(t)).backward()
    g_train = flat_grad()
    if before is not None:
        u = w - before  # the last step's update
        terms = (g_train @ u, g_val @ u, g_train @ g_train, g_val @ g_val, u @ u)
        sums = [s + float(x) for s, x in zip(sums, terms)]
    before = w
    opt.step()
    if (t + 1) % 20 == 0:
        h_train, h_val = (sums[i] / math.sqrt(sums[2 + i] * sums[4]) for i in (0, 1))
        print(f"{task} lr {lr:g} step {t + 1:5d} h_train {h_train:+.3f} h_val {h_val:+.3f} eval {evaluate():.4f}")
        sums = [0.0] * 5
