"""Shared by the tests: launch train.py as a user would, and read what it wrote."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--block_size",
    "32",
    "--per_device_train_batch_size",
    "4",
    "--per_device_eval_batch_size",
    "4",
    "--max_train_steps",
    "16",
    "--eval_steps",
    "4",
    "--controller_interval",
    "4",
    "--controller_trial_steps",  # the rl search's segments (20 by default): 4 here, so that a trial fits in 16 steps
    "4",
    "--max_eval_batches",
    "2",
    "--num_warmup_steps",
    "2",
    "--config_overrides",
    "n_layer=1,n_embd=32,n_head=2",
    "--sample_tokens",
    "8",
    "--final_eval_batches",  # the whole validation split takes longer than the run; test_train covers it
    "8",
    "--cpu_threads",  # one torch thread per process: tests run side by side (pytest -n 2)
    "1",
]


def launch_cmd(script, processes=1, config=None, launcher=False):
    """The command that runs a script of this repository: `accelerate launch` for several processes or a config file
    (several processes take a free port, not 29500: the tests run side by side); one process without a config runs
    `python script` (the same run: train.py gives the one process its rank and world size; the launcher's own
    start, ~7 s of imports, is left out) unless launcher is True or a list of the launcher's own flags."""
    if not (processes > 1 or config or launcher):
        return [sys.executable, os.path.join(ROOT, script)]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes)]
    cmd += launcher if isinstance(launcher, list) else []
    cmd += ["--config_file", os.path.join(ROOT, config)] if config else []
    cmd += ["--main_process_port", "0"] if processes > 1 else []
    return cmd + [os.path.join(ROOT, script)]


def launch(args, processes=1, config=None, check=True, launcher=False, cwd=ROOT):
    cmd = launch_cmd("train.py", processes, config, launcher) + args
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    return p


def error_lines(p):
    """The `train.py: error: ...` lines a finished process printed (under accelerate launch a traceback follows)."""
    return [line for line in p.stderr.splitlines() if line.startswith("train.py: error:")]


def rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def results(out):
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


CUSTOM_CODE = """from transformers import GPT2Config, GPT2LMHeadModel


class TinyCustomConfig(GPT2Config):
    model_type = "tiny_custom"


class TinyCustomForCausalLM(GPT2LMHeadModel):
    config_class = TinyCustomConfig
"""
NO_CHECKPOINTING = "    supports_gradient_checkpointing = False\n"


def custom_code_model(path, checkpointing=True):
    """A tiny GPT-2 saved as a model of a type transformers does not know, whose classes are Python code in its
    directory (`auto_map`), as hub models with their own code are; with the byte tokenizer. checkpointing=False: its
    class says it does not support activation checkpointing. Returns the path."""
    from transformers import ByT5Tokenizer, GPT2Config, GPT2LMHeadModel

    os.makedirs(path, exist_ok=True)
    tok = ByT5Tokenizer()
    config = GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=64, vocab_size=len(tok))
    GPT2LMHeadModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    with open(os.path.join(path, "modeling_tiny_custom.py"), "w") as f:
        f.write(CUSTOM_CODE + ("" if checkpointing else NO_CHECKPOINTING))
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config |= {
        "model_type": "tiny_custom",
        "architectures": ["TinyCustomForCausalLM"],
        "auto_map": {
            "AutoConfig": "modeling_tiny_custom.TinyCustomConfig",
            "AutoModelForCausalLM": "modeling_tiny_custom.TinyCustomForCausalLM",
        },
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return str(path)
