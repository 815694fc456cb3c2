"""Side-by-side evidence that the controller replaces a learning-rate sweep.

Every method runs train.py (one process, the run `accelerate launch train.py` makes) under one token budget, with
the same data, model and seeds; the table (results.md, summary.json) and plots land in --output_dir. One task per
invocation; finished runs are reused, so an interrupted benchmark continues where it stopped, and after a change to
controller.py only the `rl` runs whose logged decisions it no longer takes run again.

    python benchmark.py --task plays --output_dir bench/plays       # the default task (about 1 h on 2 CPU cores)
    python benchmark.py --task pydocs --output_dir bench/pydocs     # other text, a deeper model, from scratch
    python benchmark.py --task finetune --output_dir bench/finetune # a train.py-pretrained model on other text
    python benchmark.py --quick --output_dir /tmp/b                 # a reduced version, a few minutes (the tests)
    python benchmark.py --overhead                                  # the controller's cost, per model size
    python benchmark.py --throughput                                # train.py vs a bare PyTorch loop, tokens/s
    python benchmark.py -- --model_name_or_path gpt2 --train_file my.txt  # your own task: flags after -- go to train.py

Methods, under one token budget (the tokens the final weights have seen; discarded trials are counted apart):
  oracle       warmup + cosine AdamW, no controller, at each lr of --sweep: L* = the best mean final eval loss
  rl           the controller from each start lr0 = lr* x --start_factors (1 = the good start: rl vs off), its
               search on top of the budget (at most --search_budget more tokens: "1.10x") and inside it ("1.00x")
  constant     constant lr from each bad start, no controller
  plateau      ReduceLROnPlateau (controller.py's "plateau") from each start, constant base lr
  seed         the design's fixed formulas (controller.py's "seed") on warmup + cosine
  lr_find      an lr range test (its steps discarded, on top), then warmup + cosine at its lr
  schedulefree Schedule-Free AdamW from each start (its own warmup, constant lr), ZeRO-0
  prodigy      Prodigy at lr 1.0 with warmup + cosine (start-independent)
"""

import argparse
import ast
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.abspath(__file__))
SWEEP = "1e-4,3e-4,1e-3,3e-3,1e-2,3e-2"


# ----------------------------------------------------------------------------- the tasks
def usable_cores():
    """The CPU cores this process may run on (os.sched_getaffinity is Linux's; macOS has only the count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pydocs_files(data_dir):
    """Other text, offline: the docstrings of Python's standard library and pydoc's topics (about 2 MB of
    technical English), one JSON line per text; every 20th text is held out for validation."""
    train, valid = os.path.join(data_dir, "pydocs_train.jsonl"), os.path.join(data_dir, "pydocs_valid.jsonl")
    if os.path.isfile(valid):
        return train, valid
    import pydoc_data.topics

    lib, docs = sysconfig.get_paths()["stdlib"], []
    for d, dirs, names in os.walk(lib):
        dirs[:] = sorted(x for x in dirs if x not in ("test", "tests", "idlelib", "site-packages", "__pycache__"))
        for name in sorted(n for n in names if n.endswith(".py")):
            try:
                with open(os.path.join(d, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            nodes = (n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)))
            docs += [doc for doc in map(ast.get_docstring, nodes) if doc and len(doc) > 40]
    docs += [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    os.makedirs(data_dir, exist_ok=True)
    for path, keep in ((train, lambda i: i % 20), (valid, lambda i: not i % 20)):
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for i, t in enumerate(docs) if keep(i))
        os.replace(path + ".tmp", path)
    return train, valid


def task_flags(args):
    """train.py flags of the task (before --learning_rate and the method's own)."""
    if args.task == "plays":
        return []
    data = os.path.join(args.output_dir, "data")
    train, valid = pydocs_files(data)
    if args.task == "pydocs":  # from scratch, other text, a deeper and narrower model
        return ["--train_file", train, "--validation_file", valid, "--config_overrides", "n_layer=6,n_embd=96,n_head=4"]
    base = os.path.join(data, "plays-model")  # finetune: the default model pretrained on the plays by train.py
    if not os.path.isfile(os.path.join(base, "model.safetensors")):
        print(f"== pretraining the model to fine-tune: train.py on the plays, {args.pretrain_steps} steps -> {base}")
        launch(
            args,
            [
                "--output_dir",
                base,
                "--overwrite_output_dir",
                "--controller",
                "off",
                "--sample_tokens",
                "0",
                "--max_train_steps",
                str(args.pretrain_steps),
            ],
            threads=2,
        )
    return ["--model_name_or_path", base, "--train_file", train, "--validation_file", valid, "--max_train_steps", "200"]


# ----------------------------------------------------------------------------- running train.py
def launch(args, flags, threads):
    """One train.py run, in a process of its own: `python train.py` (one process: train.py gives it its rank and world
    size, the run `accelerate launch --num_processes 1 train.py` makes, without the launcher's ~7 s start), its torch
    and OpenMP threads set to `threads`."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--cpu_threads", str(threads), *flags]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if p.returncode != 0:
        sys.exit(
            f"benchmark.py: error: a train.py run failed (exit {p.returncode}): {' '.join(flags)}\n{p.stderr[-3000:]}"
        )


def run(args, name, flags):
    """One train.py run (reused if it already finished with the same flags); returns
    (results, metrics rows)."""
    out = os.path.join(args.output_dir, name)
    flags = flags + args.task_flags + args.passthrough
    if os.path.isfile(os.path.join(out, "results.json")) and os.path.isfile(os.path.join(out, "flags.json")):
        with open(os.path.join(out, "flags.json")) as f:
            same_flags = json.load(f) == flags
        if same_flags:
            res, rows = load(out)
            if replays(flags, res, rows):
                return res, rows
    t = time.time()
    launch(args, ["--output_dir", out, "--overwrite_output_dir", "--sample_tokens", "0", *flags], args.threads)
    with open(os.path.join(out, "flags.json"), "w") as f:
        json.dump(flags, f)
    res, rows = load(out)
    print(
        f"  {name:36s} eval_loss {res['eval_loss']:.4f}  tokens {res['tokens_seen']:,}  {time.time() - t:.0f}s",
        flush=True,
    )
    return res, rows


def replays(flags, res, rows):
    """Whether this controller.py, fed the observations a finished `rl` run logged, takes every decision the run
    took: only then is the run the one this code would make, and reused (after a change to the controller only the
    runs it changes are run again). Other methods are reused on their flags alone."""
    if res.get("controller") != "rl":
        return True
    import controller as ctl
    import train  # the run's own flag parsing and controller construction

    args = train.parse_args([*flags, "--output_dir", os.devnull])
    if res["nonfinite_steps"] or not args.max_train_steps or args.lr_find_steps:
        return False  # not in the log: the non-finite steps' timing; not in the flags: the budget, the start lr
    step_tokens = args.per_device_train_batch_size * args.block_size * res["num_processes"]
    step_tokens *= args.gradient_accumulation_steps
    budget = args.max_train_steps * step_tokens
    c = train.make_controller(args, args.learning_rate, budget, step_tokens)

    def unread():  # the run did not evaluate there: this controller must not read the loss either
        raise LookupError

    c.start(res.get("initial_eval_loss"))  # (logs from before it: None, so no plateau verdict; docs/results.md)
    warmup = args.num_warmup_steps * step_tokens
    state = train.TrainState(budget, args.search_in_budget, args.search_budget, 1, args.learning_rate, {})  # its .end
    for r in (r for r in rows if "controller/action" in r):
        state.tokens_spent, state.model_tokens = r["tokens_seen"], r["tokens_kept"]  # (the schedule's end)
        obs = ctl.Observation(
            tokens=r["tokens_seen"],
            eval_loss=r.get("eval_loss", unread),
            progress=r["tokens_kept"] / budget,
            hypergradient=r.get("hypergradient"),
            schedule=train.schedule(args.lr_scheduler_type, r["tokens_kept"], warmup, state.end),
        )
        try:
            got = c.step(obs).as_dict()
        except LookupError:
            return False
        got.pop("reward")  # the first one depends on the initial eval loss, which the log does not hold
        if any(v != r["controller/" + k] for k, v in got.items()):
            return False
    return True


def load(out):
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return res, [json.loads(line) for line in f]


def run_all(args, jobs):
    """jobs: {key: (name, flags)}; runs them --jobs at a time; returns {key: (results, rows)}."""
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {k: pool.submit(run, args, name, flags) for k, (name, flags) in jobs.items()}
        return {k: f.result() for k, f in futures.items()}


def fmt(x):
    return f"{x:.2g}"


METHODS = {
    "rl": lambda lr: ["--learning_rate", str(lr), "--controller", "rl"],
    "rl (1.00x)": lambda lr: ["--learning_rate", str(lr), "--controller", "rl", "--search_in_budget"],
    "constant": lambda lr: [
        "--learning_rate",
        str(lr),
        "--controller",
        "off",
        "--lr_scheduler_type",
        "constant_with_warmup",
    ],
    "plateau": lambda lr: [
        "--learning_rate",
        str(lr),
        "--controller",
        "plateau",
        "--lr_scheduler_type",
        "constant_with_warmup",
    ],
    "seed": lambda lr: ["--learning_rate", str(lr), "--controller", "seed"],
    "lr_find": lambda lr: ["--learning_rate", str(lr), "--controller", "off", "--lr_find_steps", "30"],
    "schedulefree": lambda lr: [
        "--learning_rate",
        str(lr),
        "--controller",
        "off",
        "--optimizer",
        "schedulefree",
        "--lr_scheduler_type",
        "constant",
        "--zero_stage",
        "0",
    ],
    "prodigy": lambda lr: ["--learning_rate", "1.0", "--controller", "off", "--optimizer", "prodigy"],
}
HEADLINE = ("rl", "rl (1.00x)")  # every seed; the others one seed unless they come close to L*


# ----------------------------------------------------------------------------- the comparison
def comparison(args):
    os.makedirs(args.output_dir, exist_ok=True)
    t0 = time.time()
    args.task_flags = task_flags(args)
    seeds = list(range(args.seeds))
    sweep = [float(x) for x in args.sweep.split(",")]
    print(f"== {args.task}: oracle sweep over {len(sweep)} learning rates (seed 0)")
    oracle = run_all(
        args, {lr: (f"oracle_lr{fmt(lr)}_s0", METHODS["constant"](lr)[:4] + ["--seed", "0"]) for lr in sweep}
    )
    lr_star = min(oracle, key=lambda lr: oracle[lr][0]["eval_loss"])
    print(f"== more seeds at lr* = {lr_star:g} and its neighbours")  # the pick of lr* itself rests on 3 seeds
    near = [lr for lr in sweep if abs(math.log10(lr / lr_star)) < 0.6]
    more = run_all(
        args,
        {
            (lr, s): (f"oracle_lr{fmt(lr)}_s{s}", METHODS["constant"](lr)[:4] + ["--seed", str(s)])
            for lr in near
            for s in seeds[1:]
        },
    )
    by_seed = {lr: {0: oracle[lr]} | {s: more[(lr, s)] for s in seeds[1:] if (lr, s) in more} for lr in sweep}
    mean = {lr: statistics.mean(r[0]["eval_loss"] for r in by_seed[lr].values()) for lr in sweep}
    lr_star = min(near, key=mean.get)
    l_star = mean[lr_star]
    starts = [lr_star * float(f) for f in args.start_factors.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    jobs = {}
    bad = [lr0 for lr0 in starts if abs(lr0 / lr_star - 1) > 1e-9]  # at the good start only rl (vs the oracle = off)
    for lr0 in starts:
        for m in methods:
            if (m not in HEADLINE and lr0 not in bad) or (m == "prodigy" and lr0 != bad[0]):
                continue  # prodigy is start-independent: one row
            for s in seeds if m in HEADLINE else seeds[:1]:
                key = "prodigy" if m == "prodigy" else f"{m.replace(' (1.00x)', '_in')}_lr{fmt(lr0)}"
                jobs[(m, lr0, s)] = (f"{key}_s{s}", METHODS[m](lr0) + ["--seed", str(s)])
    print(f"== {len(jobs)} runs from the starts {', '.join(fmt(x) for x in starts)}")
    runs = run_all(args, jobs)
    # a one-seed row that comes within 3x the oracle's seed spread of L* gets the other seeds too
    spread = statistics.stdev(r[0]["eval_loss"] for r in by_seed[lr_star].values()) if len(seeds) > 1 else 0.0
    close = {
        (m, lr0)
        for (m, lr0, s), r in runs.items()
        if s == 0 and m not in HEADLINE and r[0]["eval_loss"] - l_star < 3 * spread
    }
    runs |= run_all(
        args,
        {
            (m, lr0, s): (jobs[(m, lr0, 0)][0][:-1] + str(s), jobs[(m, lr0, 0)][1][:-2] + ["--seed", str(s)])
            for m, lr0 in close
            for s in seeds[1:]
        },
    )
    table = summarize(args, sweep, mean, lr_star, l_star, by_seed, runs, starts, methods, time.time() - t0)
    plot(args, starts, lr_star, by_seed, runs)
    return table


def summarize(args, sweep, mean, lr_star, l_star, by_seed, runs, starts, methods, wall):
    """results.md and summary.json: mean +- standard deviation over seeds, gap to L*, and the paired difference
    to the oracle at lr* with the same seed."""
    oracle = {s: r[0]["eval_loss"] for s, r in by_seed[lr_star].items()}
    budget = by_seed[lr_star][0][0]["tokens_kept"]
    rows, out = [], []

    def row(method, start, results):
        losses = {s: r[0]["eval_loss"] for s, r in results.items()}
        vals = list(losses.values())
        mu = statistics.mean(vals)
        sd = statistics.stdev(vals) if len(vals) > 1 else float("nan")
        paired = [100 * (losses[s] - oracle[s]) / oracle[s] for s in sorted(losses) if s in oracle]
        cost = max(r[0]["tokens_seen"] for r in results.values()) / budget
        pm = f"{statistics.mean(paired):+.1f}%" + (
            f" ({', '.join(f'{p:+.1f}' for p in paired)})" if len(paired) > 1 else ""
        )
        rows.append(
            f"| {method} | {start} | {len(vals)} | {mu:.4f} | {sd:.4f} | {100 * (mu - l_star) / l_star:+.1f}% | "
            f"{pm} | {cost:.2f}x |"
        )
        out.append(
            {
                "method": method,
                "start": start,
                "eval_loss": losses,
                "mean": mu,
                "std": sd,
                "gap_pct": 100 * (mu - l_star) / l_star,
                "paired_pct": paired,
                "cost": cost,
            }
        )

    row("oracle (best of sweep)", f"lr*={fmt(lr_star)}", by_seed[lr_star])
    for lr0 in starts:
        for m in methods:
            res = {s: r for (mm, l0, s), r in runs.items() if mm == m and l0 == lr0}
            if res:
                row(m, "lr=1.0" if m == "prodigy" else f"{fmt(lr0)} ({lr0 / lr_star:.2g}x)", res)
    sweep_line = ", ".join(f"{lr:g}: {mean[lr]:.4f} ({len(by_seed[lr])})" for lr in sweep)
    final = {r[0]["final_eval_batches"] for r in [*runs.values(), *(x for s in by_seed.values() for x in s.values())]}
    evaluated = "the whole validation split" if final == {"all"} else f"{'/'.join(map(str, final))} validation batches"
    head = (
        "| method | start | seeds | final eval loss (mean) | std | gap to L* | paired vs oracle at lr*, same seeds "
        "(mean; per seed) | tokens spent / budget |\n|---|---|---|---|---|---|---|---|"
    )
    text = (
        f"Task {args.task}. Oracle sweep, final eval loss on {evaluated} (mean over the seeds in "
        f"brackets): {sweep_line}\n\nL* = {l_star:.4f} at lr* = {lr_star:g}; the budget is {budget:,} tokens; the "
        f"sweep costs {len(sweep)}x that per seed. Wall time of this benchmark: {wall / 60:.0f} min "
        f"({args.jobs} runs at a time, {args.threads} thread(s) each).\n\n{head}\n" + "\n".join(rows) + "\n"
    )
    print(text)
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump(
            {
                "task": args.task,
                "l_star": l_star,
                "lr_star": lr_star,
                "sweep": {str(k): v for k, v in mean.items()},
                "rows": out,
            },
            f,
            indent=1,
        )
    return text


def plot(args, starts, lr_star, by_seed, runs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(starts), figsize=(4.5 * len(starts), 3.8), squeeze=False)
    ref = by_seed[lr_star][0][1]
    for ax, lr0 in zip(axes[0], starts):
        ax.plot(
            [r["tokens_kept"] for r in ref], [r["eval_loss"] for r in ref], "k--", label=f"oracle lr*={fmt(lr_star)}"
        )
        for (m, l0, s), (_, rows) in sorted(runs.items(), key=lambda kv: kv[0][0]):
            if l0 == lr0 and s == 0:
                rows = [r for r in rows if "eval_loss" in r and not r.get("controller/cool")]
                ax.plot([r["tokens_kept"] for r in rows], [r["eval_loss"] for r in rows], label=m, lw=1)
        ax.set(title=f"start {fmt(lr0)} ({lr0 / lr_star:.2g}x lr*)", xlabel="tokens kept", ylabel="eval loss")
        ax.set_ylim(None, min(4.0, ax.get_ylim()[1]))
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(args.output_dir, "eval_loss.png"), dpi=80)
    fig, ax = plt.subplots(figsize=(6, 4))
    for (m, lr0, s), (_, rows) in runs.items():
        if m == "rl" and s == 0:
            pts = [(r["tokens_seen"], r["lr"]) for r in rows if "lr" in r and not r.get("controller/cool")]
            ax.semilogy(*zip(*pts), marker=".", label=f"rl from {fmt(lr0)}")
    ax.axhline(lr_star, color="k", ls="--", lw=0.8)
    ax.set(title="rl: learning rate at each evaluation (lr* dashed)", xlabel="tokens spent")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(args.output_dir, "controller_trajectories.png"), dpi=80)
    plt.close("all")


# ----------------------------------------------------------------------------- overhead and throughput
SIZES = {
    "0.86M": [],
    "25M": ["--config_overrides", "n_layer=8,n_embd=512,n_head=8"],
    "124M": ["--config_overrides", "n_layer=12,n_embd=768,n_head=12"],
}


def overhead(args):
    """Per model size, rl against off with the default decision interval (20 steps), a checkpoint every 10 steps
    and room for the rl search's trial (its slot saves and loads, the worst case): wall time per token spent,
    peak memory, bytes written, and the size of a step_N checkpoint against off's (the largest, the last). Also one rl
    decision's own cost."""
    sys.path.insert(0, ROOT)
    import controller as ctl

    c = ctl.Controller("rl", 1e-3, (1e-5, 1e-1), 1, (1, 4), budget_tokens=10**9, interval=20)
    c.start(5.0)
    n, t = 2000, time.perf_counter()
    for i in range(n):
        c.step(ctl.Observation(tokens=1000 * (i + 1), eval_loss=3.0 - 1e-4 * i, hypergradient=-0.01))
    per = (time.perf_counter() - t) / n
    print(f"one rl decision: {per * 1e6:.1f} us (mean of {n})")
    args.task_flags, lines = [], []
    report = {"decision_us": per * 1e6, "sizes": {}}
    for size in args.sizes.split(","):
        steps = 40 if size == "124M" else 60
        common = SIZES[size] + [
            "--per_device_train_batch_size",
            "4",
            "--max_train_steps",
            str(steps),
            "--eval_steps",
            "20",
            "--checkpointing_steps",
            "10",
            "--final_eval_batches",
            "8",
            "--seed",
            "0",
            "--search_budget",
            "0.7",
            "--learning_rate",
            "3e-2",
        ]
        res, ck = {}, {}
        for i, pol in enumerate(["off", "rl"] * args.repeats):  # interleaved against drift
            res.setdefault(pol, []).append(run(args, f"overhead_{size}_{pol}_{i // 2}", common + ["--controller", pol]))
            ck.setdefault(pol, measured_checkpoints(os.path.join(args.output_dir, f"overhead_{size}_{pol}_{i // 2}")))

        per_token = {p: statistics.mean(r[0]["wall_s"] / r[0]["tokens_seen"] for r in res[p]) for p in res}
        ratio = per_token["rl"] / per_token["off"]
        off_at = {s: ck["off"].get(s, ck["off"][max(ck["off"])]) for s in ck["rl"]}  # rl's steps run past off's
        during, after = max(ck["rl"], key=lambda s: ck["rl"][s] / off_at[s]), max(ck["rl"])  # the largest, the last
        r_off, r_rl = res["off"][0][0], res["rl"][0][0]
        report["sizes"][size] = {
            "wall_per_token_rl_over_off": ratio,
            "runs": {p: [r[0] for r in res[p]] for p in res},
            "checkpoint_bytes": ck,
        }
        lines.append(
            f"| {size} | {ratio:.3f} | {r_off['peak_memory_mb']:.0f} / {r_rl['peak_memory_mb']:.0f} | "
            f"{mb(r_off.get('bytes_written'))} / {mb(r_rl.get('bytes_written'))} | "
            f"{ck['rl'][during] / off_at[during]:.2f}x (step {during}) | "
            f"{ck['rl'][after] / off_at[after]:.2f}x (step {after}) | {r_rl['tokens_discarded']:,} |"
        )
    text = (
        "| model | wall per token, rl / off | peak RSS MB, off / rl | MB written, off / rl | step_N rl / off, "
        "the largest | the last | tokens rl discarded |\n|---|---|---|---|---|---|---|\n" + "\n".join(lines)
    )
    print(text)
    with open(os.path.join(args.output_dir, "overhead.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.output_dir, "overhead.md"), "w") as f:
        f.write(f"one rl decision: {per * 1e6:.1f} us\n\n" + text + "\n")


def mb(x):
    return "-" if x is None else f"{x / 2**20:.0f}"


def measured_checkpoints(out):
    """{step: bytes} of a run's step_N checkpoints, kept in checkpoint_sizes.json: a run that just wrote them is
    measured and its checkpoints deleted (4 of a 124M run take 10 GB); a reused run's measurement is read back."""
    path = os.path.join(out, "checkpoint_sizes.json")
    written = [n for n in os.listdir(out) if n.startswith("step_")]
    if written or not os.path.isfile(path):
        with open(path, "w") as f:
            json.dump(checkpoint_sizes(out), f)
        for n in written:
            shutil.rmtree(os.path.join(out, n))
    with open(path) as f:
        return {int(k): v for k, v in json.load(f).items()}


def checkpoint_sizes(out):
    """{step: bytes} of the step_N checkpoints of a run, files counted once (hard links are not copies)."""
    sizes, seen = {}, set()
    for name in sorted(
        (n for n in os.listdir(out) if n.startswith("step_") and n[5:].isdigit()), key=lambda n: int(n[5:])
    ):
        total = 0
        for d, _, files in os.walk(os.path.join(out, name)):
            for f in files:
                st = os.stat(os.path.join(d, f))
                total += 0 if (st.st_dev, st.st_ino) in seen else st.st_size
                seen.add((st.st_dev, st.st_ino))
        sizes[int(name[5:])] = total
    return sizes


def throughput(args):
    """train.py's training tokens/s (evaluation excluded) against a bare PyTorch loop with the same model, batch and
    threads (forward, backward, clip, AdamW step), measured side by side, interleaved."""
    args.task_flags = []
    steps, threads = 150, usable_cores()
    flags = [
        "--controller",
        "off",
        "--max_train_steps",
        str(steps),
        "--eval_steps",
        str(steps),
        "--max_eval_batches",
        "1",
        "--final_eval_batches",
        "1",
    ]
    bare, ours = [], []
    for i in range(args.repeats):
        cmd = [sys.executable, os.path.join(ROOT, "benchmark.py"), "--bare_loop", str(steps)]
        bare.append(float(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()[-1]))
        args.threads = threads
        ours.append(run(args, f"throughput_{i}", flags)[0]["train_tokens_per_s"])
    ratio = statistics.mean(ours) / statistics.mean(bare)
    print(f"tokens/s: train.py {[round(x) for x in ours]}, bare loop {[round(x) for x in bare]}; ratio {ratio:.3f}")
    with open(os.path.join(args.output_dir, "throughput.json"), "w") as f:
        json.dump({"train_py": ours, "bare": bare, "ratio": ratio}, f, indent=1)


def bare_loop(steps):
    """The reference: the default model and batch in a plain loop, same threads, no Accelerate, no DeepSpeed."""
    import torch
    from transformers import AutoModelForCausalLM, ByT5Tokenizer, GPT2Config

    torch.set_num_threads(usable_cores())
    tok = ByT5Tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=128,
        n_layer=4,
        n_head=4,
        n_positions=128,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        vocab_size=len(tok),
    )
    model = AutoModelForCausalLM.from_config(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    data = torch.randint(3, 259, (steps, 16, 128))
    t0 = time.perf_counter()  # every step timed, as train.py's train_tokens_per_s does
    for i in range(steps):
        loss = model(input_ids=data[i], labels=data[i]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        loss.item()  # train.py syncs once per step too
    print(f"bare tokens/s {steps * 16 * 128 / (time.perf_counter() - t0):.1f}")


# ----------------------------------------------------------------------------- main
def parse_args():
    argv = sys.argv[1:]
    passthrough = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda msg: sys.exit(f"benchmark.py: error: {msg}")  # one line, not the usage block
    p.add_argument("--task", default="plays", choices=["plays", "pydocs", "finetune"], help="The built-in task.")
    p.add_argument("--output_dir", default="bench", help="Where runs, the table (results.md) and plots go.")
    p.add_argument("--sweep", default=SWEEP, help="Oracle grid of learning rates (at least 5 for the real benchmark).")
    p.add_argument("--start_factors", default="0.0333,0.1,1,10,30", help="Starts, as multiples of the oracle's lr*.")
    p.add_argument("--methods", default=",".join(METHODS), help="Methods to run from the starts.")
    p.add_argument("--seeds", type=int, default=3, help="Seeds for the oracle at lr* and the rl rows.")
    p.add_argument("--jobs", type=int, default=2, help="train.py runs at a time.")
    p.add_argument("--threads", type=int, default=0, help="Torch threads per run (0: cores / jobs).")
    p.add_argument("--pretrain_steps", type=int, default=1600, help="finetune: steps of the pretraining on the plays.")
    p.add_argument("--quick", action="store_true", help="Tiny model, short budget, 2-point sweep: a few minutes.")
    p.add_argument("--overhead", action="store_true", help="Measure the controller's cost instead.")
    p.add_argument("--sizes", default="0.86M,25M", help="--overhead: model sizes, of " + ", ".join(SIZES))
    p.add_argument("--throughput", action="store_true", help="Measure train.py's tokens/s against a bare loop instead.")
    p.add_argument("--repeats", type=int, default=2, help="--overhead/--throughput: interleaved repeats.")
    args = p.parse_args(argv)
    for flag in ("seeds", "jobs", "repeats", "pretrain_steps"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.threads < 0:
        p.error(f"--threads must be 0 (cores / jobs) or more, got {args.threads}")
    args.passthrough = passthrough
    args.threads = args.threads or max(1, usable_cores() // args.jobs)
    if args.quick:
        args.sweep, args.start_factors, args.seeds, args.pretrain_steps = "3e-3,3e-2", "1,10", 2, 40
        args.methods = "rl,rl (1.00x),constant,prodigy"
        args.passthrough = [
            "--block_size",
            "32",
            "--per_device_train_batch_size",
            "4",
            "--max_train_steps",
            "24",
            "--eval_steps",
            "4",
            "--controller_interval",
            "4",
            "--controller_trial_steps",
            "4",
            "--max_eval_batches",
            "2",
            "--num_warmup_steps",
            "2",
            "--config_overrides",
            "n_layer=1,n_embd=32,n_head=2",
            "--search_budget",
            "0.5",
            "--final_eval_batches",  # the whole split (811 batches of 16) takes longer than the run
            "16",
            *passthrough,
        ]
    return args


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--bare_loop":
        bare_loop(int(sys.argv[2]))
    else:
        a = parse_args()
        os.makedirs(a.output_dir, exist_ok=True)
        overhead(a) if a.overhead else throughput(a) if a.throughput else comparison(a)
