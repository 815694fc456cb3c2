"""The README's snippet, executed as written, in a plain PyTorch loop on a small regression network (no Accelerate,
no DeepSpeed, a loss near 0): the controller at the best lr ends where the loop alone does, and rescues a start
30x too low and one 10x too high.

Run: python -m pytest -q tests/test_plain_loop.py      (about 30 seconds)
"""

import math
import os
import re

import pytest
import torch
from helpers import ROOT

BEST_LR = 3e-2  # the best of 1e-3, 3e-3, 1e-2, 3e-2, 1e-1 for this task, found by a sweep with the loop alone


def readme_snippet():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text[text.index("### Using controller.py in your own loop") :]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def cosine(steps):
    return lambda frac: min(1.0, (steps * frac + 1) / 31) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def run(base_lr, policy, seed=0, steps=1000, schedule=None, env=None, poison=(), make_opt=None):
    torch.manual_seed(seed)
    x, w = torch.randn(4096, 16), torch.randn(16, 1)
    y = torch.sin(x @ w) + 0.1 * torch.randn(4096, 1)
    xv = torch.randn(1024, 16)
    yv = torch.sin(xv @ w)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)
    )
    order = torch.cat([torch.randperm(4096, generator=torch.Generator().manual_seed(seed)) for _ in range(40)])

    def evaluate():
        with torch.no_grad():
            return torch.nn.functional.mse_loss(model(xv), yv).item()

    def batch(pos):  # a batch at a position in `poison` has an infinite target: a corrupt record
        i = order[pos * 32 : (pos + 1) * 32]
        return model(x[i]), y[i] + (math.inf if pos in poison else 0.0)

    env = env if env is not None else {}
    env |= {
        "model": model,
        "opt": make_opt(model, base_lr) if make_opt else torch.optim.Adam(model.parameters(), lr=base_lr),
        "base_lr": base_lr,
        "steps": steps,
        "tokens_per_step": 32,
        "evaluate": evaluate,
        "batch": batch,
        "loss_fn": torch.nn.functional.mse_loss,
        "schedule": schedule or cosine(steps),
    }
    code = readme_snippet().replace('"rl"', f'"{policy}"')
    exec(compile(code, "README.md", "exec"), env)  # noqa: S102 - the README's own code, run as the user would
    return evaluate(), env["spent"]


@pytest.fixture(scope="module")
def off():
    return {lr: run(lr, "off")[0] for lr in (BEST_LR / 30, BEST_LR, BEST_LR * 10)}


def test_at_the_best_lr_the_controller_ends_where_the_loop_alone_does(off):
    loss, _ = run(BEST_LR, "rl")
    assert loss <= off[BEST_LR] * 1.02, (loss, off[BEST_LR])


def test_a_start_30x_too_low_is_rescued(off):
    loss, spent = run(BEST_LR / 30, "rl")
    assert loss < off[BEST_LR / 30] / 5 and spent <= 1000 * 1.1, (loss, off)


@pytest.fixture
def actions(monkeypatch):
    """The controller's decisions in the runs of a test, in order."""
    import controller

    seen, step = [], controller.Controller.step
    monkeypatch.setattr(controller.Controller, "step", lambda c, obs: seen.append(step(c, obs)) or seen[-1])
    return seen


def test_at_the_best_lr_a_comparison_on_the_early_plateau_waits(actions):
    """300 steps, seed 5: the first segment reads too high and its trial a decade lower wins by noise, both cooled
    losses within PLATEAU of the initial one (the network has not left its plateau): the start goes on at its lr and
    the search waits. Taking the trial's win kept this run on the plateau (0.51 against the loop alone's 0.12)."""
    loss_off, _ = run(BEST_LR, "off", seed=5, steps=300)
    loss, _ = run(BEST_LR, "rl", seed=5, steps=300)
    assert "plateau_wait" in [d.action for d in actions] and loss <= loss_off * 1.01, (loss, loss_off)


def test_off_the_plateau_the_reopened_search_runs_no_trial(actions):
    """1000 steps, seed 5: after the plateau's wait the loss falls below the band and the search opens again from the
    live weights; its first segment reads too high, and it commits at the start's lr (the lr that took the loss off
    the plateau) with no trial. A trial a decade lower there won the cooled comparison (where the short horizon
    favours lower lrs) and, after a climb and an undo, ended at 0.058 against the loop alone's 0.019."""
    loss_off, _ = run(BEST_LR, "off", seed=5)
    loss, _ = run(BEST_LR, "rl", seed=5)
    names = [d.action for d in actions]
    after = names[names.index("search_again") + 1 :]
    assert not any(a.startswith("trial") for a in after) and loss <= loss_off * 1.01, (after, loss, loss_off)


def test_a_short_run_from_a_too_low_start_spends_exactly_its_budget():
    """200 steps: the first segment and the climb's are 11 steps, which do not divide the budget; nothing is
    discarded from a too-low start, and the last segment stops at the end (it once ran on past it)."""
    loss, spent = run(BEST_LR / 30, "rl", steps=200)
    assert spent == 200 and math.isfinite(loss)


def test_a_start_10x_too_high_is_rescued(off):
    loss, spent = run(BEST_LR * 10, "rl")
    assert loss < off[BEST_LR * 10] / 5 and spent <= 1000 * 1.1, (loss, off)


def test_a_short_run_whose_first_segment_blew_up_restarts_lower():
    """60 steps from 100x the best lr: too short for a trial, but the first 5 steps more than doubled the initial loss
    (the snippet passes `evaluate` to start()): a decade lower from the initial weights, within the 10%."""
    loss_off, _ = run(BEST_LR * 100, "off", steps=60)
    loss, spent = run(BEST_LR * 100, "rl", steps=60)
    assert loss < loss_off / 2 and spent <= 66, (loss, loss_off, spent)


@pytest.mark.parametrize("policy", ["rl", "off"])
def test_a_corrupt_batch_is_skipped_and_never_reaches_the_weights(policy, off):
    """A batch with an infinite target at step 300: the snippet skips the update (Adam would write NaN into every
    weight) and counts it for the controller (rl lowers the lr); the run ends finite, near a clean run's loss."""
    env = {}
    loss, _ = run(BEST_LR, policy, poison={300}, env=env)
    assert env["skipped"] >= 1 and all(torch.isfinite(p).all() for p in env["model"].parameters())
    assert math.isfinite(loss) and loss < off[BEST_LR] * 1.5, (loss, off[BEST_LR])


def test_a_flat_schedule_ends_in_the_controllers_cooldown():
    """The snippet passes its schedule's factor: under a constant lr the controller's multiplier falls over the last
    20% (the last step's lr is below a tenth of the committed one); under the cosine it adds no cooldown."""
    flat, cos = {}, {}
    run(BEST_LR, "rl", steps=250, schedule=lambda frac: 1.0, env=flat)
    run(BEST_LR, "rl", steps=250, env=cos)
    committed = BEST_LR * flat["c"].lr_scale
    assert 0 < flat["opt"].param_groups[0]["lr"] < committed / 10 and flat["c"].policy.cool_m == 0
    assert cos["c"].policy.cool_m is None


def test_each_param_group_keeps_its_own_lr(actions):
    """An optimizer whose param groups have their own lrs (the output layer at a tenth here): the snippet scales each
    group's lr by the controller's multiplier, so the groups keep their ratio through the search and its rollbacks."""
    env = {}

    def two_groups(model, lr):
        return torch.optim.Adam(
            [{"params": model[:-1].parameters()}, {"params": model[-1].parameters(), "lr": lr / 10}], lr=lr
        )

    loss, _ = run(BEST_LR * 10, "rl", steps=300, env=env, make_opt=two_groups)
    first, last = (g["lr"] for g in env["opt"].param_groups)
    assert math.isfinite(loss) and first > 0 and last == pytest.approx(first / 10, rel=1e-9), (first, last)
    names = [d.action for d in actions]
    assert any(a.startswith("trial") for a in names) and any(d.load for d in actions), names  # a trial, a rollback


@pytest.mark.parametrize("chunk", [1 << 16, 7])
@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.AdamW])
def test_gradient_probe_reads_the_cosines_it_defines(opt_cls, chunk, monkeypatch):
    """GradientProbe's two readings against the same sums taken by hand in float64 over a window of steps: the
    gradient against the previous update (the hypergradient) and against the previous gradient (the alignment).
    With plain SGD the update is -lr * gradient, so the hypergradient is minus the alignment. The probe sums in
    slices on the CPU: one slice per tensor here, or slices of 7 elements (the last one shorter)."""
    import train
    from train import GradientProbe

    monkeypatch.setattr(train, "PROBE_CHUNK", chunk)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    opt = opt_cls(model.parameters(), lr=0.05)
    probe = GradientProbe(opt)
    x, y = torch.randn(6, 32, 8), torch.randn(6, 32, 2)
    sums, prev = torch.zeros(5, dtype=torch.float64), None
    for t in range(6):
        if t == 2:
            probe.start()
        opt.zero_grad(set_to_none=False)  # gradients in the same buffers each step (as DeepSpeed keeps them)
        torch.nn.functional.mse_loss(model(x[t]), y[t]).backward()
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()
        before = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
        if t > 2:  # the first measured step only records the update
            gp, u = prev
            sums += torch.stack([g @ u, g @ gp, g @ g, u @ u, gp @ gp])
        opt.step()
        prev = (g, torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double() - before)
    gu, ggp, gg, uu, gpgp = sums.tolist()
    h, align = probe.read()
    assert h == pytest.approx(gu / math.sqrt(gg * uu), abs=1e-5) and align == pytest.approx(
        ggp / math.sqrt(gg * gpgp), abs=1e-5
    )
    assert -1 < h < 1 and -1 < align < 1 and h != 0 and not probe.active
    if opt_cls is torch.optim.SGD:
        assert h == pytest.approx(-align, abs=1e-5)


def plain_tasks():
    """docs/experiments/plain_tasks.py, loaded as a module (it is a script, not on the path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("plain_tasks", os.path.join(ROOT, "docs/experiments/plain_tasks.py"))
    tasks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tasks)
    return tasks


def test_the_experiments_plain_loops_train_at_the_lr_they_are_given():
    """docs/experiments/plain_tasks.py runs this snippet on its loops, whose optimizers are built at a fixed lr: the
    snippet scales each group's own lr, so the script sets every group to the lr it is given first (it once trained
    every lr of a sweep at the optimizer's built-in one)."""
    tasks = plain_tasks()
    made, make = [], tasks.make
    tasks.make = lambda *args: made.append(make(*args)) or made[-1]  # keep each loop's optimizer to look at
    losses = [tasks.run("linreg", lr, "off", 0, 20)[0] for lr in (1e-4, 3e-2)]
    last = tasks.schedule_fn("cosine", 20)(19 / 20)  # the loop's factor at its last step
    assert [[g["lr"] for g in m[1].param_groups] for m in made] == [[pytest.approx(lr * last)] for lr in (1e-4, 3e-2)]
    assert losses[0] != losses[1]


def test_the_experiments_linear_schedule_is_transformers_linear_decay():
    """plain_tasks.py's `linear` (docs/experiments: the loops under transformers' default schedule): past its warmup
    it is get_linear_schedule_with_warmup's factor step for step, and it ends at 0."""
    from transformers import get_linear_schedule_with_warmup

    tasks = plain_tasks()
    steps, warmup = 500, 15  # 3% of the run
    ours, cos = tasks.schedule_fn("linear", steps), tasks.schedule_fn("cosine", steps)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    hf = get_linear_schedule_with_warmup(opt, warmup, steps).lr_lambdas[0]
    after = range(warmup, steps + 1)
    assert [ours(s / steps) for s in after] == pytest.approx([hf(s) for s in after])
    assert [ours(s / steps) for s in range(warmup)] == pytest.approx([(s + 1) / (warmup + 1) for s in range(warmup)])
    assert ours(0) == cos(0) > 0  # the warmup as the cosine's in that file: the first step is not wasted at lr 0
    assert ours(1.0) == 0 and ours(0.5) == pytest.approx((1 - 0.5) / (1 - 0.03))
    with pytest.raises(ValueError, match="schedule must be one of cosine, cosine0, constant, wsd, linear"):
        tasks.schedule_fn("linar", steps)  # a misspelt kind was a cosine


def test_the_experiments_plain_grid_counts_the_targets_and_compares_two_grids(tmp_path, capsys):
    """docs/experiments/plain_grid.py, the plain-loop check of a controller change: it runs a grid cell into the file
    the comparison reads (with the probe or without: hypergradient=None), counts a good start above `off` + 0.5% as
    failed and a bad start at <= 1.02 L* as within 2%, and compares two grids run by run (a candidate's grid of `rl`
    runs takes its `off` runs from the other)."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("plain_grid", os.path.join(ROOT, "docs/experiments/plain_grid.py"))
    grid = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(grid)
    assert sum(len(lrs) for *_, lrs in grid.JOBS) == 334 and {t for t, *_ in grid.JOBS} == set(grid.plain_tasks.TASKS)

    grid.one((str(tmp_path / "real"), "linreg", 20, "cosine", "rl", 0.1, 0))  # one real run of the README's loop
    (cell,) = grid.load(str(tmp_path / "real")).items()
    assert cell[0] == ("linreg", 20, "cosine") and 0 < cell[1]["rl"][0.1][0] < 10
    # --probe no: the snippet passes hypergradient=None; linreg from 3 (3x its best lr, cosine) blows up in its first
    # segment, and the search by trials goes lower (it went on from the blown-up weights: inf)
    for probe in (True, False):
        grid.one((str(tmp_path / f"probe_{probe}"), "linreg", 500, "cosine", "rl", 3.0, 0), probe=probe)
    ends = [grid.load(str(tmp_path / f"probe_{p}"))[("linreg", 500, "cosine")]["rl"][3.0][0] for p in (True, False)]
    assert ends[1] < 0.1 and ends[0] != ends[1]

    def write(out, policy, lr, losses):
        for seed, loss in enumerate(losses):
            f = tmp_path / out / "500_cosine" / f"linreg_{policy}_{lr:g}_{seed}.json"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(json.dumps({"task": "linreg", "lr": lr, "policy": policy, "seed": seed, "loss": loss}))

    write("base", "off", 0.1, [1.0] * 3)
    write("base", "off", 1.0, [0.5] * 3)  # lr* = 1, L* = 0.5
    write("base", "rl", 1.0, [0.51] * 3)  # +2%: the good start fails
    write("base", "rl", 0.1, [0.505] * 3)  # +1% on L*: within 2%
    write("new", "rl", 1.0, [0.5] * 3)
    write("new", "rl", 0.1, [0.6, float("inf"), 0.505])  # a non-finite end counts as inf
    grid.targets(grid.load(str(tmp_path / "base")))
    assert "500 cosine: good start fails 1 / 1; bad starts within 2%: 1 / 1" in capsys.readouterr().out
    grid.compare(grid.load(str(tmp_path / "base")), grid.load(str(tmp_path / "new")))
    out = capsys.readouterr().out
    assert "rl runs: 3 lower by over 1%, 2 higher, 1 within 1%" in out
    assert "new  500 cosine: good start fails 0 / 1; bad starts within 2%: 0 / 1" in out
    write("zero", "off", 1.0, [0.5] * 3)
    write("zero", "rl", 0.1, [0.0, float("inf"), 0.2])  # a base of exactly 0, a non-finite one
    write("later", "rl", 0.1, [0.1, 0.3, 0.2])
    grid.compare(grid.load(str(tmp_path / "zero")), grid.load(str(tmp_path / "later")))
    assert "rl runs: 1 lower by over 1%, 1 higher, 1 within 1%" in capsys.readouterr().out


def test_the_experiments_plain_tasks_refuses_bad_arguments_in_one_line_before_writing(tmp_path):
    """docs/experiments/plain_tasks.py's command line: a STEPS, LRS, SEEDS, POLICIES, SCHEDULE or MAX_SCALE it cannot
    run is a one-line error that names the argument, before OUT_DIR is made (it was a traceback); plain_grid.py's
    --policies and --probe too."""
    import subprocess
    import sys

    script = os.path.join(ROOT, "docs/experiments/plain_tasks.py")
    for args, name in [
        (["1.5", "1e-3", "0", "rl"], "STEPS"),
        (["10,20", "1e-3", "0", "rl"], "STEPS"),
        (["10", "1e-3,x", "0", "rl"], "LRS"),
        (["10", "1e-3", "0,x", "rl"], "SEEDS"),
        (["10", "1e-3", "0", "rl,bogus"], "POLICIES"),
        (["10", "1e-3", "0", "rl", "cosin"], "SCHEDULE"),
        (["10", "1e-3", "0", "rl", "cosine", "0.5"], "MAX_SCALE"),
    ]:
        out = tmp_path / name
        cmd = [sys.executable, script, "mlp_adam", *args[:4], str(out), *args[4:]]
        r = subprocess.run(cmd, check=False, capture_output=True, text=True)
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and len(lines) == 1, r.stderr
        assert lines[0].startswith(f"plain_tasks.py: error: {name} "), r.stderr
        assert not out.exists()
    grid, out = os.path.join(ROOT, "docs/experiments/plain_grid.py"), tmp_path / "grid"
    for flag, value in (("--policies", "rl,bogus"), ("--probe", "maybe")):
        r = subprocess.run(
            [sys.executable, grid, "run", str(out), flag, value], check=False, capture_output=True, text=True
        )
        assert r.returncode != 0 and r.stderr.strip().startswith(f"plain_grid.py: error: {flag} ") and not out.exists()
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
