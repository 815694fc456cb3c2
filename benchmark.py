"""Side-by-side evidence that the controller replaces a learning-rate sweep.

Every method runs `accelerate launch train.py` (as a user would) under one token budget,
with the same data, model and seeds; the table and plots land in --output_dir.

    python benchmark.py                          # the default task (about 1 hour on 2 CPU cores)
    python benchmark.py --quick                  # a reduced version, a few minutes (used by the tests)
    python benchmark.py --overhead               # the controller's own cost, and rl vs off wall time
    python benchmark.py --throughput             # train.py vs a bare PyTorch loop, tokens/s
    python benchmark.py -- --model_name_or_path gpt2 --train_file my.txt   # your own task: flags after -- go to train.py

Methods, under one token budget (a batch-size change spends tokens, not steps):
  oracle       warmup + cosine AdamW, no controller, at each lr of --sweep: L* = best final eval loss
  constant     constant lr from each bad start lr0 (starts = lr* x --start_factors), no controller
  plateau      ReduceLROnPlateau (controller.py's "plateau") from each start, constant base lr
  seed         the design's fixed formulas (controller.py's "seed") on warmup + cosine
  rl           the learned controller on warmup + cosine
  lr_find      an lr range test (its steps count in the budget), then warmup + cosine at its lr
  schedulefree Schedule-Free AdamW from each start (its own warmup, constant lr), ZeRO-0
  prodigy      Prodigy at lr 1.0 with warmup + cosine (start-independent)
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.abspath(__file__))


def parse_args():
    argv = sys.argv[1:]
    passthrough = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="bench", help="Where runs, the table (results.md) and plots go.")
    p.add_argument("--sweep", default="1e-4,3e-4,1e-3,3e-3,1e-2,3e-2", help="Oracle grid of learning rates (at least 5 for the real benchmark).")
    p.add_argument("--start_factors", default="0.0333,0.1,10,30", help="Bad starts, as multiples of the oracle's best lr.")
    p.add_argument("--starts", default=None, help="Explicit bad starting lrs (comma-separated); replaces --start_factors.")
    p.add_argument("--methods", default="constant,plateau,seed,rl,lr_find,schedulefree,prodigy", help="Methods to run from the bad starts.")
    p.add_argument("--seeds", type=int, default=2, help="Seeds for the headline rows (oracle and rl); other rows use the first seed.")
    p.add_argument("--lr_find_steps", type=int, default=30, help="Steps of the lr_find peer's range test.")
    p.add_argument("--quick", action="store_true", help="Tiny model, short budget, 2-point sweep, one start: a few minutes.")
    p.add_argument("--overhead", action="store_true", help="Measure the controller's cost instead.")
    p.add_argument("--throughput", action="store_true", help="Measure train.py's tokens/s against a bare PyTorch loop instead.")
    args = p.parse_args(argv)
    args.passthrough = passthrough
    if args.quick:
        args.sweep, args.start_factors, args.seeds = "3e-3,3e-2", "10", 1
        args.methods, args.lr_find_steps = "constant,rl,prodigy", 6
        args.passthrough = ["--block_size", "32", "--per_device_train_batch_size", "4", "--max_train_steps", "24",
                            "--eval_steps", "4", "--controller_interval", "4", "--max_eval_batches", "2", "--num_warmup_steps", "2",
                            "--config_overrides", "n_layer=1,n_embd=32,n_head=2"] + passthrough
    return args


def run(args, name, flags):
    """One `accelerate launch train.py` run; returns (results, metrics rows, wall seconds). Reuses a finished run."""
    out = os.path.join(args.output_dir, name)
    if os.path.isfile(os.path.join(out, "results.json")) and os.path.isfile(os.path.join(out, "flags.json")):
        with open(os.path.join(out, "flags.json")) as f:
            if json.load(f) == flags + args.passthrough:
                return load(out)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", os.path.join(ROOT, "train.py"),
           "--output_dir", out, "--overwrite_output_dir", "--sample_tokens", "0", *flags, *args.passthrough]
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        sys.exit(f"benchmark.py: error: run {name} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    with open(os.path.join(out, "flags.json"), "w") as f:
        json.dump(flags + args.passthrough, f)
    with open(os.path.join(out, "launch_wall_s.txt"), "w") as f:
        f.write(str(time.time() - t))
    res, rows, _ = load(out)
    print(f"  {name:32s} eval_loss {res['eval_loss']:.4f}  wall {res['wall_s']:.0f}s  tokens {res['tokens_seen']:,}", flush=True)
    return res, rows, res["wall_s"]


def load(out):
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return res, rows, res["wall_s"]


def fmt_lr(x):
    return f"{x:.2g}"


def comparison(args):
    os.makedirs(args.output_dir, exist_ok=True)
    seeds = list(range(args.seeds))
    sweep = [float(x) for x in args.sweep.split(",")]
    print(f"== oracle sweep over {len(sweep)} learning rates x {len(seeds)} seeds")
    oracle = {lr: [run(args, f"oracle_lr{fmt_lr(lr)}_s{s}", ["--learning_rate", str(lr), "--controller", "off", "--seed", str(s)]) for s in seeds]
              for lr in sweep}
    mean = {lr: statistics.mean(r[0]["eval_loss"] for r in runs) for lr, runs in oracle.items()}
    lr_star = min(mean, key=mean.get)
    l_star = mean[lr_star]
    oracle_wall = statistics.mean(r[2] for r in oracle[lr_star])
    oracle_tokens = oracle[lr_star][0][0]["tokens_seen"]
    print(f"L* = {l_star:.4f} at lr* = {lr_star:g}")
    starts = [float(x) for x in args.starts.split(",")] if args.starts else [lr_star * float(f) for f in args.start_factors.split(",")]
    methods = args.methods.split(",")
    flags = {
        "constant": lambda lr: ["--learning_rate", str(lr), "--controller", "off", "--lr_scheduler_type", "constant_with_warmup"],
        "plateau": lambda lr: ["--learning_rate", str(lr), "--controller", "plateau", "--lr_scheduler_type", "constant_with_warmup"],
        "seed": lambda lr: ["--learning_rate", str(lr), "--controller", "seed"],
        "rl": lambda lr: ["--learning_rate", str(lr), "--controller", "rl"],
        "lr_find": lambda lr: ["--learning_rate", str(lr), "--controller", "off", "--lr_find_steps", str(args.lr_find_steps)],
        "schedulefree": lambda lr: ["--learning_rate", str(lr), "--controller", "off", "--optimizer", "schedulefree",
                                    "--lr_scheduler_type", "constant", "--zero_stage", "0"],
        "prodigy": lambda lr: ["--learning_rate", "1.0", "--controller", "off", "--optimizer", "prodigy"],
    }
    table = [("oracle (best of sweep)", "lr*=" + fmt_lr(lr_star), oracle[lr_star])]
    runs_by = {}
    for lr0 in starts:
        print(f"== start lr0 = {lr0:.3g} ({lr0 / lr_star:.3g} x lr*)")
        for m in methods:
            if m == "prodigy" and "prodigy" in runs_by:
                continue  # start-independent: one row
            ss = seeds if m == "rl" else seeds[:1]
            key = "prodigy" if m == "prodigy" else f"{m}_lr{fmt_lr(lr0)}"
            runs_by[key] = [run(args, f"{key}_s{s}", flags[m](lr0) + ["--seed", str(s)]) for s in ss]
            table.append((m, "lr=1.0" if m == "prodigy" else f"{fmt_lr(lr0)} ({lr0 / lr_star:.2g}x)", runs_by[key]))

    # cost in training tokens (exact, the same on any machine); wall seconds are as measured, and noisy on a shared machine
    lines = ["| method | start | final eval loss (mean, min-max over seeds) | seeds | gap to L* | wall s | tokens | cost vs one oracle run (tokens) |",
             "|---|---|---|---|---|---|---|---|"]
    for m, start, runs in table:
        losses = [r[0]["eval_loss"] for r in runs]
        walls = [r[2] for r in runs]
        mu = statistics.mean(losses)
        spread = f"{min(losses):.4f}-{max(losses):.4f}" if len(losses) > 1 else "-"
        lines.append(f"| {m} | {start} | {mu:.4f} ({spread}) | {len(losses)} | {100 * (mu - l_star) / l_star:+.1f}% | "
                     f"{statistics.mean(walls):.0f} | {runs[0][0]['tokens_seen']:,} | {runs[0][0]['tokens_seen'] / oracle_tokens:.2f}x |")
    sweep_line = ", ".join(f"{lr:g}: {mean[lr]:.4f}" for lr in sweep)
    text = (f"Oracle sweep (mean final eval loss over {len(seeds)} seeds): {sweep_line}\n\n"
            f"L* = {l_star:.4f} at lr* = {lr_star:g}; one oracle run = {oracle_wall:.0f} s, {oracle_tokens:,} tokens; "
            f"the sweep itself costs {len(sweep)}x one run ({len(sweep) * oracle_tokens:,} tokens) per seed.\n\n" + "\n".join(lines) + "\n")
    print(text)
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump({"l_star": l_star, "lr_star": lr_star, "sweep": mean,
                   "rows": [{"method": m, "start": s, "eval_loss": [r[0]["eval_loss"] for r in runs], "wall_s": [r[2] for r in runs]}
                            for m, s, runs in table]}, f, indent=1)
    plot(args, starts, lr_star, oracle, runs_by, methods)


def plot(args, starts, lr_star, oracle, runs_by, methods):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(starts), figsize=(5 * len(starts), 4), squeeze=False)
    for ax, lr0 in zip(axes[0], starts):
        rows = oracle[lr_star][0][1]
        ax.plot([r["tokens_seen"] for r in rows], [r["eval_loss"] for r in rows], "k--", label=f"oracle lr*={lr_star:g}")
        for m in methods:
            key = "prodigy" if m == "prodigy" else f"{m}_lr{fmt_lr(lr0)}"
            if key in runs_by:
                rows = runs_by[key][0][1]
                ax.plot([r["tokens_seen"] for r in rows], [r["eval_loss"] for r in rows], label=m)
        ax.set(title=f"start lr0 = {lr0:.2g}", xlabel="tokens", ylabel="eval loss", ylim=(None, min(4.0, ax.get_ylim()[1])))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(args.output_dir, "eval_loss.png"), dpi=80)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    rows = oracle[lr_star][0][1]
    axes[0].semilogy([r["tokens_seen"] for r in rows], [r["lr"] for r in rows], "k--", label="oracle schedule")
    for lr0 in starts:
        key = f"rl_lr{fmt_lr(lr0)}"
        if key in runs_by:
            rows = runs_by[key][0][1]
            axes[0].semilogy([r["tokens_seen"] for r in rows], [r["lr"] for r in rows], marker=".", label=f"rl from {lr0:.2g}")
            axes[1].plot([r["tokens_seen"] for r in rows], [r["effective_batch_size"] for r in rows], marker=".", label=f"rl from {lr0:.2g}")
    axes[0].set(title="learning rate (at each evaluation)", xlabel="tokens")
    axes[1].set(title="effective batch size (sequences)", xlabel="tokens")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(args.output_dir, "controller_trajectories.png"), dpi=80)
    plt.close("all")


def overhead(args):
    """One decision's cost (pure Python), and the wall time of rl vs off for the same steps."""
    sys.path.insert(0, ROOT)
    import controller as ctl

    c = ctl.Controller("rl", 1e-3, (1e-5, 1e-1), 1, (1, 4), probe_trials=0)
    n = 2000
    t = time.perf_counter()
    for i in range(n):
        c.step({"tokens": 1000 * (i + 1), "eval_loss": 3.0 - 1e-4 * i, "progress": i / n})
    per = (time.perf_counter() - t) / n
    print(f"one rl decision: {per * 1e6:.1f} us (mean of {n})")
    os.makedirs(args.output_dir, exist_ok=True)
    walls = {}
    for pol in ("off", "rl", "off", "rl"):  # interleaved, so drift in machine load hits both
        res, _, _ = run(args, f"overhead_{pol}_{len(walls.get(pol, []))}", ["--controller", pol, "--seed", "0"])
        walls.setdefault(pol, []).append(res["wall_s"])
    ratio = statistics.mean(walls["rl"]) / statistics.mean(walls["off"])
    print(f"wall time rl / off, same steps: {ratio:.3f} (rl {walls['rl']}, off {walls['off']})")
    with open(os.path.join(args.output_dir, "overhead.json"), "w") as f:
        json.dump({"decision_us": per * 1e6, "wall_rl_over_off": ratio, "walls": walls}, f, indent=1)


def throughput(args):
    """train.py's training tokens/s (evaluation excluded) against a bare PyTorch loop with the same model,
    batch and threads (forward, backward, clip, AdamW step), measured side by side."""
    os.makedirs(args.output_dir, exist_ok=True)
    steps = 150
    flags = ["--controller", "off", "--max_train_steps", str(steps), "--eval_steps", str(steps), "--max_eval_batches", "1"]
    bare, ours = [], []
    for i in range(2):  # interleaved
        out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmark.py"), "--bare_loop", str(steps)], capture_output=True,
                             text=True, check=True).stdout
        bare.append(float(out.split()[-1]))
        res, _, _ = run(args, f"throughput_{i}", flags)
        ours.append(res["train_tokens_per_s"])
    ratio = statistics.mean(ours) / statistics.mean(bare)
    print(f"tokens/s: train.py {ours}, bare loop {bare}; ratio {ratio:.3f}")
    with open(os.path.join(args.output_dir, "throughput.json"), "w") as f:
        json.dump({"train_py": ours, "bare": bare, "ratio": ratio}, f, indent=1)


def bare_loop(steps):
    """The reference: the default model and batch in a plain loop, same threads, no Accelerate, no DeepSpeed."""
    sys.path.insert(0, ROOT)
    import torch
    from transformers import AutoModelForCausalLM, ByT5Tokenizer, GPT2Config

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    tok = ByT5Tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(n_embd=128, n_layer=4, n_head=4, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0,
                                                        attn_pdrop=0.0, vocab_size=len(tok)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    data = torch.randint(3, 259, (steps, 16, 128))
    t0 = time.perf_counter()  # every step timed, as train.py's train_tokens_per_s does
    for i in range(steps):
        loss = model(input_ids=data[i], labels=data[i]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    print(f"bare tokens/s {steps * 16 * 128 / (time.perf_counter() - t0):.1f}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--bare_loop":
        bare_loop(int(sys.argv[2]))
    else:
        a = parse_args()
        if a.overhead:
            overhead(a)
        elif a.throughput:
            throughput(a)
        else:
            comparison(a)
