"""The measurements behind the rl search (README.md here says which figure each gives). One thread each, results
as JSON in results/. Usage:

    python probes.py grid TASK LR SEED        # a whole warmup + cosine run; raw and cooled evals early on
    python probes.py switch TASK LR_A LR_B T0 # LR_A for T0 steps, then LR_B from those weights
    python probes.py damage TASK LR_HIGH LR SEED  # LR_HIGH for 20 steps, then LR with AdamW's state kept / reset
    python probes.py trials TASK SEED         # short trials of 9 lrs from the same initial weights and batches
    python probes.py hypergradient TASK SEED  # per-step hypergradient and gradient alignment for 9 lrs
    python probes.py midrun TASK LR VARIANT SEED   # VARIANT: base, batch2x, beta2 (from half the budget)
    python probes.py controller TASK LR0 SEED [off]  # controller.py in a plain loop (the README's protocol)
    python probes.py pretrain                 # the plays model after 1600 steps, for the ft task
"""

import json
import os
import sys

import torch
from lab import PRETRAINED, RESULTS, Run, cosine

import controller as ctl
from train import GradientProbe

GRID = [3e-4, 5.6e-4, 1e-3, 1.8e-3, 3.2e-3, 5.6e-3, 1e-2, 1.8e-2, 3.2e-2]


def save(name, out):
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, name + ".json"), "w") as f:
        json.dump(out, f)
    print(name, {k: v for k, v in out.items() if not isinstance(v, (dict, list))})


def grid(task, lr, seed):
    r = Run(task, int(seed), budget=200 if task == "ft" else 400)
    lr, out = float(lr), {"raw": {}, "cool8": {}}
    for t in range(1, r.budget + 1):
        r.train(1, lr)
        if t % 10 == 0:
            out["raw"][t] = r.evaluate()
        if t in (20, 40, 60):
            out["cool8"][t] = r.cooled(8, lr)
    save(f"grid_{task}_{lr:g}_{seed}", out | {"final64": r.evaluate(64)})


def switch(task, lr_a, lr_b, t0):
    r = Run(task, 0)
    for t in range(r.budget):
        r.train(1, float(lr_a) if t < int(t0) else float(lr_b))
    save(f"switch_{task}_{float(lr_a):g}_{float(lr_b):g}_{t0}", {"final64": r.evaluate(64)})


def damage(task, lr_high, lr, seed):
    """LR_HIGH for 20 steps from the initial weights, then LR: with AdamW's state kept, with it reset, and LR from the
    initial weights (the reference); eval loss every 20 steps to 120. Is a too-high start's damage in the weights or
    in the optimizer's moments?"""
    out = {}
    for variant in ("init", "keep", "reset"):
        r = Run(task, int(seed))
        if variant != "init":
            r.train(20, float(lr_high))
            if variant == "reset":  # AdamW's moments and step count; the next step starts them afresh
                r.opt.state.clear()
        out[variant] = {}
        while r.model_steps < 120:
            r.train(20, float(lr))
            out[variant][r.model_steps] = r.evaluate()
    save(f"damage_{task}_{float(lr_high):g}_{float(lr):g}_{seed}", out)


def trials(task, seed):
    r = Run(task, int(seed), budget=200 if task == "ft" else 400)
    init, out = r.fork(), {}
    for lr in GRID:
        r.restore(init)
        out[lr] = {}
        for t in range(1, 21):
            r.train(1, lr)
            if t in (8, 12, 16, 20):
                out[lr][t] = {"raw": r.evaluate(), "cool4": r.cooled(4, lr), "cool8": r.cooled(8, lr)}
    save(f"trials_{task}_{seed}", out)


def hypergradient(task, seed):
    """The GradientProbe's statistics over steps 11-20 and 31-40 of a run at each lr."""
    r = Run(task, int(seed), budget=200 if task == "ft" else 400)
    init, out, probe = r.fork(), {}, GradientProbe(r.opt)
    for lr in GRID:
        r.restore(init)
        out[lr] = {}
        for window in ((10, 20), (30, 40)):
            r.train(window[0] - r.model_steps, lr)
            probe.start()
            r.train(window[1] - window[0], lr)
            out[lr][f"{window[0] + 1}-{window[1]}"] = probe.read()
    save(f"hypergradient_{task}_{seed}", out)


def midrun(task, lr, variant, seed):
    r, lr, micro, budget = Run(task, int(seed)), float(lr), 0, 400
    while micro < budget:
        late = micro >= budget // 2
        gas = min(2 if variant == "batch2x" and late else 1, budget - micro)
        if variant == "beta2" and late:
            for g in r.opt.param_groups:
                g["betas"] = (0.9, 0.99)
        for g in r.opt.param_groups:
            g["lr"] = lr * cosine(micro, 10, budget)  # the schedule over tokens
        for _ in range(gas):
            x = r.next_batch()
            (r.model(input_ids=x, labels=x).loss / gas).backward()
        torch.nn.utils.clip_grad_norm_(r.model.parameters(), 1.0)
        r.opt.step()
        r.opt.zero_grad(set_to_none=True)
        micro += gas
    save(f"midrun_{task}_{variant}_{seed}", {"final64": r.evaluate(64)})


def controller(task, lr0, seed, policy="rl"):
    """controller.py driven as the README's snippet drives it, on a lab task."""
    r, lr0, interval = Run(task, int(seed), budget=200 if task == "ft" else 400), float(lr0), 20
    c = ctl.Controller(
        policy,
        lr=lr0,
        lr_bounds=(lr0 / 100, lr0 * 100),
        grad_accum=1,
        grad_accum_bounds=(1, 1),
        budget_tokens=r.budget * 2048,
        interval=interval,
        tokens_per_step=2048,
    )
    probe, slots, log = GradientProbe(r.opt), {}, []

    def apply(d):
        if d.save:
            slots[d.save] = r.fork()
        if d.load:
            r.restore(slots[d.load])
        for name in d.drop:
            slots.pop(name, None)

    d = c.start(r.evaluate())
    apply(d)
    while r.model_steps < r.budget:
        n = d.steps or interval
        for i in range(n if d.cool else min(n, r.budget - r.model_steps)):
            if d.measure and i == n // 2:
                probe.start()
            r.step(lr0 * r.factor() * d.lr_at(i, n))
            r.model_steps, r.spent = r.model_steps + 1, r.spent + 1
        if r.model_steps >= r.budget:
            break
        h, _ = probe.read() if probe.active else (None, None)
        d = c.step(
            ctl.Observation(
                tokens=r.spent * 2048, eval_loss=r.evaluate(), progress=r.model_steps / r.budget, hypergradient=h
            )
        )
        apply(d)
        log.append({"spent": r.spent, "h": h, "action": d.action, "lr_scale": d.lr_scale})
    save(f"controller_{task}_{policy}_{lr0:g}_{seed}", {"final64": r.evaluate(64), "spent": r.spent, "log": log})


def pretrain():
    r = Run("plays", 0, budget=1600)
    r.train(1600, 3e-3)
    os.makedirs(RESULTS, exist_ok=True)
    torch.save(r.model.state_dict(), PRETRAINED)
    print("pretrained, eval", r.evaluate(64))


if __name__ == "__main__":
    torch.set_num_threads(1)
    {
        "grid": grid,
        "switch": switch,
        "damage": damage,
        "trials": trials,
        "hypergradient": hypergradient,
        "midrun": midrun,
        "controller": controller,
        "pretrain": pretrain,
    }[sys.argv[1]](*sys.argv[2:])
