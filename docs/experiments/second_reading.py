"""Does a second reading, or the first segment's cooldown, tell a false suspicion of a too-high lr from a true one?
Measured for docs/experiments/README.md ("A second reading before the trial"); lab hooks, not used by train.py or the
tests.

second: each `rl` run stops at the search's first decision when the first segment does not read too high (h <= 0);
  when it does, the run goes on at the same lr for one more segment of the same length (no cooldown, no trial) and
  stops after that segment's reading. Prints h1, h2 and the eval losses after each segment.
verdict: the kept controller's search, every eval loss read, stopped after the trial's verdict; runs whose first
  reading is not too high are skipped. Prints h1, the trial's h, the first's and the trial's losses before and after
  their cooldowns (and the cooldown's relative gain), and the verdict.

    python docs/experiments/second_reading.py second|verdict plain TASK STEPS LRS SEEDS   # the plain loops
    python docs/experiments/second_reading.py second|verdict train [train.py flags]       # one train.py process
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import plain_tasks  # (puts the repository root on sys.path)

import controller as ctl


class Stop(Exception):
    pass


record, _search = {}, ctl.RL._gradient_search


def loss_of(obs):
    obs.eval_loss = obs.eval_loss() if callable(obs.eval_loss) else obs.eval_loss
    return obs.eval_loss


def second(self, c, obs, nonfinite):
    if "h1" not in record:
        record.update(h1=obs.hypergradient, l1=loss_of(obs))
        if obs.hypergradient <= 0:
            raise Stop
        return ctl.Decision(c.lr_scale, c.grad_accum, steps=c.trial_segment(), measure=True, phase="search")
    record.update(h2=obs.hypergradient, l2=loss_of(obs))
    raise Stop


def verdict(self, c, obs, nonfinite):
    stage = self.stage
    record[stage] = (loss_of(obs), obs.hypergradient)
    d = _search(self, c, obs, nonfinite)
    if stage == "first" and self.stage != "cool_first":
        raise Stop
    if stage == "cool_trial":
        record["verdict"] = d.action
        raise Stop
    return d


def line():
    r = record
    if "verdict" in r:
        (f, h1), (fc, _), (t, ht), (tc, _) = r["first"], r["cool_first"], r["trial"], r["cool_trial"]
        return (
            f"h1 {h1:+.4f} h_trial {ht:+.4f} first {f:.4g} -> {fc:.4g} ({(f - fc) / f:+.2f}) "
            f"trial {t:.4g} -> {tc:.4g} ({(t - tc) / t:+.2f}) {r['verdict']}"
        )
    if "h2" in r:
        return f"h1 {r['h1']:+.4f} h2 {r['h2']:+.4f} loss {r['l1']:.4g} -> {r['l2']:.4g}"
    return f"h1 {r['h1']:+.4f}" if "h1" in r else ""


if __name__ == "__main__":
    mode, where = sys.argv[1:3]
    ctl.RL._gradient_search = second if mode == "second" else verdict
    ctl.RL.skips_loss = lambda *a, **k: False  # every decision here reads the loss
    if where == "train":
        import train

        try:
            train.main(sys.argv[3:])
        except Stop:
            pass
        print(line(), flush=True)
    else:
        task, steps, lrs, seeds = sys.argv[3:7]
        for lr in map(float, lrs.split(",")):
            for seed in map(int, seeds.split(",")):
                record.clear()
                try:
                    plain_tasks.run(task, lr, "rl", seed, int(steps))
                except Stop:
                    pass
                if record.get("h1") is not None or "verdict" in record:
                    print(task, f"{lr:g}", seed, line(), flush=True)
