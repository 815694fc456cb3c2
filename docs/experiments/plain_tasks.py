"""The README's plain-PyTorch snippet, executed as written, on loops unlike the benchmark's language models: mlp_adam (a
10-class Gaussian-mixture classifier, an MLP, Adam), mlp_sgd (the same with SGD + momentum 0.9), lstm (a character
LSTM on a synthetic bracket grammar, AdamW), reg_adam and reg_sgd (the regression network of
tests/test_plain_loop.py, with Adam or SGD + momentum 0.9), reg_ovf (its target from 256 noisy points in 4
dimensions, a wider network, Adam: the validation loss falls to about 0.02, then rises as it overfits), tfm (a
2-layer causal transformer on the characters of Python's own `typing.py`, AdamW with weight decay 0.1); and four loops
added after the controller's constants were set, as a check on loops it was not tuned on: cnn, linreg, relu_reg, ae
(`fresh()`); and two held out from every constant (2026-12-05): spiral, mf (`held_out()`). The data are fixed; the seed
sets the initialisation.

    python docs/experiments/plain_tasks.py TASK STEPS LRS SEEDS POLICIES OUT_DIR [SCHEDULE [MAX_SCALE]]
    python docs/experiments/plain_tasks.py mlp_adam 1000 1e-3,1e-2 0,1,2 rl,off /tmp/plain

The schedule: 3% warmup + cosine (default), cosine0 (the cosine without a warmup), a constant lr (no warmup, no
decay), wsd (a constant lr, then a linear decay to 0 over the last 20%: the cooldown rl adds to a flat schedule, done
by the loop), or linear (3% warmup, then a linear decay to 0: transformers' default scheduler). One JSON per run in
OUT_DIR (final validation loss, tokens spent / budget); runs already there are skipped. MAX_SCALE (default 100, the
snippet's) is the top of the snippet's `lr_bounds` as a multiple of the base lr (`base_lr * MAX_SCALE`): a user's cap
on the climb; its runs go to an OUT_DIR of their own (the file names do not carry it).
Not used by train.py or the tests.
"""

import json
import math
import os
import re
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from controller import POLICIES  # (controller.py is in ROOT)

TASKS = ("mlp_adam", "mlp_sgd", "lstm", "reg_adam", "reg_sgd", "reg_ovf", "tfm", "cnn", "linreg", "relu_reg", "ae")
TASKS += ("spiral", "mf")  # held out from every constant (2026-12-05)
SCHEDULES = ("cosine", "cosine0", "constant", "wsd", "linear")  # schedule_fn's kinds; cosine is the default


def snippet():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text[text.index("### Using controller.py in your own loop") :]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def supervised(model, sgd, loss_fn, x, y, xv, yv, bs, opt=None):
    """A classifier or a regressor: Adam, SGD + momentum 0.9, or `opt`; batches in order; the whole validation set."""
    params = model.parameters()
    opt = opt or (torch.optim.SGD(params, lr=1e-2, momentum=0.9) if sgd else torch.optim.Adam(params, lr=1e-3))

    def batch(pos):
        i = torch.arange(pos * bs, (pos + 1) * bs) % x.shape[0]
        return model(x[i]), y[i]

    def evaluate():
        with torch.no_grad():
            return loss_fn(model(xv), yv).item()

    return model, opt, batch, evaluate, loss_fn, bs


def sequences(model, data, val, V, T, bs, weight_decay):
    """A next-token model on blocks of T + 1 ids: AdamW; batches of bs blocks in order; the validation blocks."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=weight_decay)

    def lm_loss(logits, tgt):
        return torch.nn.functional.cross_entropy(logits.reshape(-1, V), tgt.reshape(-1))

    def batch(pos):
        i = torch.arange(pos * bs, (pos + 1) * bs) % data.shape[0]
        return model(data[i, :-1]), data[i, 1:]

    def evaluate():
        with torch.no_grad():
            return lm_loss(model(val[:, :-1]), val[:, 1:]).item()

    return model, opt, batch, evaluate, lm_loss, bs * T


def make(task, seed):
    if task not in TASKS:  # (else it would fall through to the LSTM below)
        raise ValueError(f"unknown task {task!r}: one of {', '.join(TASKS)}")
    g = torch.Generator().manual_seed(1234)  # the data: fixed across seeds
    torch.manual_seed(seed)
    if task in ("mlp_adam", "mlp_sgd"):
        centers = torch.randn(10, 32, generator=g) * 0.4

        def draw(n):
            y = torch.randint(0, 10, (n,), generator=g)
            return centers[y] + torch.randn(n, 32, generator=g), y

        (x, y), (xv, yv) = draw(16384), draw(2048)
        model = torch.nn.Sequential(
            torch.nn.Linear(32, 128),
            torch.nn.ReLU(),
            torch.nn.Linear(128, 128),
            torch.nn.ReLU(),
            torch.nn.Linear(128, 10),
        )
        return supervised(model, task.endswith("sgd"), torch.nn.functional.cross_entropy, x, y, xv, yv, 64)
    if task in ("reg_adam", "reg_sgd"):  # the regression network of tests/test_plain_loop.py (a plateau near 0.5)
        return regression(task.endswith("sgd"), n=4096, dim=16, noise=0.1, width=64)
    if task == "reg_ovf":  # the same target from 256 noisier points and a wider network: it overfits
        return regression(False, n=256, dim=4, noise=0.3, width=256)
    if task == "tfm":
        return transformer()
    if task in ("cnn", "linreg", "relu_reg", "ae"):
        return fresh(task)
    if task in ("spiral", "mf"):
        return held_out(task)
    # lstm: a synthetic grammar of nested brackets and words
    V, T = 16, 64

    def gen(n):
        out = torch.zeros(n, T + 1, dtype=torch.long)
        for r in range(n):
            seq, depth = [], 0
            while len(seq) < T + 1:
                u = torch.rand(1, generator=g).item()
                if u < 0.2 and depth < 4:
                    seq.append(1)
                    depth += 1
                elif u < 0.4 and depth > 0:
                    seq.append(2)
                    depth -= 1
                else:
                    seq.append(3 + (depth * 3 + int(torch.randint(0, 3, (1,), generator=g))) % 13)
            out[r] = torch.tensor(seq[: T + 1])
        return out

    data, val = gen(2048), gen(256)

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.e = torch.nn.Embedding(V, 64)
            self.r = torch.nn.LSTM(64, 128, batch_first=True)
            self.o = torch.nn.Linear(128, V)

        def forward(self, s):
            return self.o(self.r(self.e(s))[0])

    return sequences(LM(), data, val, V, T, 16, weight_decay=0.01)


def regression(sgd, n, dim, noise, width):
    """sin(x @ w) + noise on n points, a 2-hidden-layer tanh network, batches of 32; validated on 1024 clean points
    (the test's data at seed 0: data 1234 leave no lr off the plateau)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(n, dim, generator=g), torch.randn(dim, 1, generator=g)
    y = torch.sin(x @ w) + noise * torch.randn(n, 1, generator=g)
    xv = torch.randn(1024, dim, generator=g)
    model = torch.nn.Sequential(
        torch.nn.Linear(dim, width),
        torch.nn.Tanh(),
        torch.nn.Linear(width, width),
        torch.nn.Tanh(),
        torch.nn.Linear(width, 1),
    )
    return supervised(model, sgd, torch.nn.functional.mse_loss, x, y, xv, torch.sin(xv @ w), 32)


def fresh(task):
    """Four loops added after the controller's constants were set, to check it on loops it was not tuned on: cnn (a
    small conv net on 12x12 images of 6 shifted noisy templates, Adam), linreg (linear regression on 64 features whose
    scales span 1.5 decades, plain SGD: its best lr is near the edge of stability), relu_reg (a ReLU MLP on a smooth
    8-d target, AdamW), ae (an autoencoder through 8 units of data near a 6-d manifold, SGD + momentum 0.9)."""
    g = torch.Generator().manual_seed(777)
    nn = torch.nn
    if task == "cnn":
        tmpl = nn.functional.avg_pool2d(torch.randn(6, 1, 14, 14, generator=g), 3, 1)

        def draw(n):
            y = torch.randint(0, 6, (n,), generator=g)
            sx, sy = torch.randint(-2, 3, (2,), generator=g).tolist()
            x = torch.roll(tmpl[y], shifts=(sx, sy), dims=(2, 3)) * 1.5 + torch.randn(n, 1, 12, 12, generator=g)
            return x, y

        (x, y), (xv, yv) = (map(torch.cat, zip(*[draw(64) for _ in range(k)])) for k in (128, 16))
        model = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 9, 6),
        )  # fmt: skip
        return supervised(model, False, nn.functional.cross_entropy, x, y, xv, yv, 64)
    if task == "linreg":
        scales, w = torch.logspace(0, -1.5, 64), torch.randn(64, 1, generator=g)
        x = torch.randn(8192, 64, generator=g) * scales
        y = x @ w + 0.3 * torch.randn(8192, 1, generator=g)
        xv = torch.randn(2048, 64, generator=g) * scales
        model = nn.Linear(64, 1)
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        return supervised(model, False, nn.functional.mse_loss, x, y, xv, xv @ w, 32, opt=opt)
    if task == "relu_reg":
        W = torch.randn(8, 4, generator=g)

        def f(x):
            return sum(torch.sin(x @ W[:, k : k + 1] * (k + 1) / 2) / (k + 1) for k in range(4))

        x = torch.randn(8192, 8, generator=g)
        y, xv = f(x) + 0.05 * torch.randn(8192, 1, generator=g), torch.randn(2048, 8, generator=g)
        model = nn.Sequential(nn.Linear(8, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 1))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        return supervised(model, False, nn.functional.mse_loss, x, y, xv, f(xv), 64, opt=opt)
    B = torch.randn(6, 48, generator=g) / math.sqrt(6)  # ae
    z = torch.randn(8192 + 1024, 6, generator=g)
    X = torch.tanh(z @ B) + 0.05 * torch.randn(8192 + 1024, 48, generator=g)
    model = nn.Sequential(
        nn.Linear(48, 64), nn.GELU(), nn.Linear(64, 8), nn.Linear(8, 64), nn.GELU(), nn.Linear(64, 48)
    )  # fmt: skip
    return supervised(model, True, nn.functional.mse_loss, X[:8192], X[:8192], X[8192:], X[8192:], 64)


def held_out(task):
    """Two loops added on 2026-12-05, after every constant was set, as a check on optimizers and layers the others lack:
    spiral (a 3-arm spiral, an MLP with BatchNorm, SGD with Nesterov momentum 0.9 and weight decay 5e-4, evaluated in
    eval mode) and mf (a rank-8 matrix of noisy ratings factorised by user and item embeddings with biases, RMSprop)."""
    g = torch.Generator().manual_seed(4321)
    nn = torch.nn
    if task == "spiral":

        def draw(n):
            y = torch.randint(0, 3, (n,), generator=g)
            r = torch.rand(n, generator=g)
            t = r * 3 * math.pi + y * 2 * math.pi / 3 + 0.3 * torch.randn(n, generator=g)
            return torch.stack([r * torch.cos(t), r * torch.sin(t)], 1), y

        (x, y), (xv, yv) = draw(8192), draw(2048)
        model = nn.Sequential(
            nn.Linear(2, 128), nn.BatchNorm1d(128), nn.ReLU(),
            nn.Linear(128, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 3),
        )  # fmt: skip
        opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, nesterov=True, weight_decay=5e-4)
        model, opt, batch, train_mode_eval, loss_fn, bs = supervised(
            model, True, nn.functional.cross_entropy, x, y, xv, yv, 64, opt=opt
        )

        def evaluate():  # the running statistics, as a BatchNorm model is evaluated
            model.eval()
            try:
                return train_mode_eval()
            finally:
                model.train()

        return model, opt, batch, evaluate, loss_fn, bs
    U, k, n = 512, 8, 32768 + 4096  # mf
    A, B = torch.randn(U, k, generator=g), torch.randn(U, k, generator=g)
    x = torch.randint(0, U, (n, 2), generator=g)
    y = ((A[x[:, 0]] * B[x[:, 1]]).sum(1, keepdim=True) / math.sqrt(k)) + 0.5 * torch.randn(n, 1, generator=g)

    class MF(nn.Module):
        def __init__(self):
            super().__init__()
            self.u, self.i, self.bu, self.bi = (
                nn.Embedding(U, 16),
                nn.Embedding(U, 16),
                nn.Embedding(U, 1),
                nn.Embedding(U, 1),
            )
            for e in (self.u, self.i):
                nn.init.normal_(e.weight, std=0.1)
            for e in (self.bu, self.bi):
                nn.init.zeros_(e.weight)

        def forward(self, x):
            u, i = x[:, 0], x[:, 1]
            return (self.u(u) * self.i(i)).sum(1, keepdim=True) + self.bu(u) + self.bi(i)

    model = MF()
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    return supervised(model, False, nn.functional.mse_loss, x[:32768], y[:32768], x[32768:], y[32768:], 128, opt=opt)


def transformer():
    """A 2-layer causal transformer (64 wide, 4 heads, pre-norm) on the characters of this Python's typing.py
    (the last tenth held out), AdamW (weight decay 0.1), batches of 16 x 64 characters in a fixed order."""
    import typing

    with open(typing.__file__, encoding="utf-8") as f:
        text = f.read()
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    T, V, bs = 64, len(chars), 16
    blocks = ids[: (len(ids) // (T + 1)) * (T + 1)].view(-1, T + 1)
    data, val = blocks[: len(blocks) * 9 // 10], blocks[len(blocks) * 9 // 10 :][:256]
    g = torch.Generator().manual_seed(1234)
    data = data[torch.randperm(len(data), generator=g)]

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.e, self.p = torch.nn.Embedding(V, 64), torch.nn.Embedding(T, 64)
            layer = torch.nn.TransformerEncoderLayer(64, 4, 256, dropout=0.0, batch_first=True, norm_first=True)
            self.t = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.n, self.o = torch.nn.LayerNorm(64), torch.nn.Linear(64, V)
            self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(T))

        def forward(self, s):
            h = self.e(s) + self.p(torch.arange(s.shape[1]))
            return self.o(self.n(self.t(h, mask=self.mask, is_causal=True)))

    return sequences(LM(), data, val, V, T, bs, weight_decay=0.1)


def schedule_fn(kind, steps):
    """The loop's lr factor at share `frac` of a `steps`-step run: 3% warmup + cosine, constant, wsd (above),
    3% warmup + linear decay, or a cosine without warmup."""
    if kind == "constant":
        return lambda frac: 1.0
    if kind == "wsd":
        return lambda frac: min(1.0, (1 - frac) / 0.2)
    if kind == "linear":  # 3% warmup, then linear to 0 (transformers' get_linear_schedule_with_warmup)
        w = steps * 0.03
        return lambda frac: (steps * frac + 1) / (w + 1) if steps * frac < w else max(0.0, (1 - frac) / (1 - 0.03))
    if kind == "cosine0":  # a cosine without warmup (torch's CosineAnnealingLR alone)
        return lambda frac: 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    if kind != "cosine":
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {kind!r}")
    return lambda frac: (
        min(1.0, (steps * frac + 1) / (steps * 0.03 + 1)) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    )


READING = "h, _ = probe.read() if probe.active else (None, None)"  # the snippet's reading of the gradient statistics


def swap(code, old, new):
    """The snippet's code with `old` replaced by `new`; a ValueError if the README's snippet no longer has `old`."""
    if old not in code:
        raise ValueError(f"the README's snippet no longer has {old!r}")
    return code.replace(old, new)


def run(task, base_lr, policy, seed, steps, schedule="cosine", max_scale=100, probe=True):
    """One run of the README's snippet: (final eval loss, tokens spent / budget). probe=False: the snippet passes
    hypergradient=None (the search by cooled trials alone, for loops that do not copy GradientProbe)."""
    model, opt, batch, evaluate, loss_fn, tps = make(task, seed)
    for g in opt.param_groups:  # the snippet scales each group's own lr: every group starts at base_lr
        g["lr"] = base_lr
    env = {
        "model": model,
        "opt": opt,
        "base_lr": base_lr,
        "steps": steps,
        "tokens_per_step": tps,
        "evaluate": evaluate,
        "batch": batch,
        "loss_fn": loss_fn,
        "schedule": schedule_fn(schedule, steps),
    }
    code = swap(snippet(), '"rl"', f'"{policy}"')
    code = swap(code, "base_lr * 100)", f"base_lr * {max_scale!r})")  # the snippet's upper lr bound
    if not probe:
        code = swap(code, READING, "h, _ = None, None")
    exec(compile(code, "README.md", "exec"), env)  # noqa: S102 - the README's own code, as in tests/test_plain_loop.py
    return evaluate(), env["spent"] / steps


def save(out, task, lr, policy, seed, steps, schedule="cosine", max_scale=100, probe=True):
    """One run into OUT/TASK_POLICY_LR_SEED.json (written whole or not at all); None if it is there already, else
    (loss, tokens spent / budget)."""
    f = os.path.join(out, f"{task}_{policy}_{lr:g}_{seed}.json")
    if os.path.exists(f):
        return None
    loss, cost = run(task, lr, policy, seed, steps, schedule, max_scale, probe)
    os.makedirs(out, exist_ok=True)
    with open(f + ".tmp", "w") as fh:  # (a killed run leaves no half-written result)
        json.dump({"task": task, "lr": lr, "policy": policy, "seed": seed, "loss": loss, "cost": cost}, fh)
    os.replace(f + ".tmp", f)
    return loss, cost


if __name__ == "__main__":
    torch.set_num_threads(1)
    if len(sys.argv) not in (7, 8, 9):
        sys.exit(f"usage: plain_tasks.py TASK STEPS LRS SEEDS POLICIES OUT_DIR [{'|'.join(SCHEDULES)} [MAX_SCALE]]")
    task, steps, lrs, seeds, policies, out = sys.argv[1:7]
    schedule = sys.argv[7] if len(sys.argv) > 7 else "cosine"
    max_scale = sys.argv[8] if len(sys.argv) > 8 else "100"

    def numbers(name, text, kind, valid, what, one=False):
        try:
            values = [kind(v) for v in text.split(",")]
        except ValueError:
            values = None
        if not values or (one and len(values) > 1) or not all(valid(v) for v in values):
            sys.exit(f"plain_tasks.py: error: {name} must be {what}, got {text!r}")
        return values

    if task not in TASKS:
        sys.exit(f"plain_tasks.py: error: TASK must be one of {', '.join(TASKS)}, got {task!r}")
    (steps,) = numbers("STEPS", steps, int, lambda v: v >= 1, "a whole number of steps >= 1", one=True)
    lrs = numbers("LRS", lrs, float, lambda v: math.isfinite(v) and v > 0, "comma-separated positive numbers")
    seeds = numbers("SEEDS", seeds, int, lambda v: True, "comma-separated whole numbers")
    policies = policies.split(",")
    if not set(policies) <= set(POLICIES):
        sys.exit(f"plain_tasks.py: error: POLICIES must be among {', '.join(POLICIES)}, got {','.join(policies)!r}")
    if schedule not in SCHEDULES:
        sys.exit(f"plain_tasks.py: error: SCHEDULE must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    (max_scale,) = numbers(
        "MAX_SCALE", max_scale, float, lambda v: math.isfinite(v) and v >= 1, "a number >= 1", one=True
    )
    os.makedirs(out, exist_ok=True)
    for lr in lrs:
        for s in seeds:
            for pol in policies:
                done = save(out, task, lr, pol, s, steps, schedule, max_scale)
                if done:
                    print(task, pol, f"{lr:g}", s, round(done[0], 5), round(done[1], 3), flush=True)
