"""Smoke runs of the real script, with a tiny model and a few steps: through `accelerate launch` for several processes
or a config file and for the default run, as `python train.py` for one process (tests/helpers.py).

Run: python -m pytest -q tests/test_train.py      (about 6 minutes on 2 CPU cores)
"""

import glob
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, TINY, custom_code_model, launch, launch_cmd, results, rows

ROW_KEYS = {
    "step",
    "tokens_seen",
    "tokens_kept",
    "train_loss",
    "eval_loss",
    "perplexity",
    "accuracy",
    "lr",
    "effective_batch_size",
    "elapsed_s",
}
RESULT_KEYS = {
    "eval_loss",
    "perplexity",
    "accuracy",
    "steps",
    "tokens_seen",
    "tokens_kept",
    "tokens_discarded",
    "wall_s",
    "train_tokens_per_s",
    "peak_memory_mb",
    "final_eval_batches",
}


def test_default_data_one_process_zero2(tmp_path):
    """Plain `accelerate launch train.py` (no config file), from another directory (ds_config.json is the one beside
    train.py): DeepSpeed ZeRO-2 on the shipped plays."""
    out = str(tmp_path / "run")
    p = launch(
        TINY + ["--output_dir", out, "--with_tracking", "--final_eval_batches", "0"], launcher=True, cwd=tmp_path
    )
    assert "Running training" in p.stdout and "ZeRO-2" in p.stdout
    assert "not a git repository" not in p.stderr and results(out)["_git_commit_hash"] is None  # (run from tmp_path)
    assert "[controller] step 4" in p.stdout and "Note: rl was measured" not in p.stdout  # warmup + cosine
    assert "rl cools" not in p.stdout
    assert "[controller] initial eval_loss" in p.stdout  # rl reads the initial loss in every run
    blocks = int(re.search(r"train blocks = (\d+)", p.stdout).group(1))  # the epochs the budget makes: tokens / data
    tokens, epochs = re.search(r"= ([\d,]+) tokens = ([\d.e+-]+) epochs", p.stdout).groups()
    assert float(epochs) == float(f"{int(tokens.replace(',', '')) / (blocks * 32):.3g}")
    r = rows(out)
    assert ROW_KEYS <= set(r[0]) and [x["step"] for x in r] == [4, 8, 12, 16]
    assert not any(str(x.get("controller/action")).startswith("final") for x in r)  # a cosine: no final cooldown
    res = results(out)
    assert RESULT_KEYS <= set(res) and res["final_eval_batches"] == "all"
    assert res["zero_stage"] == 2 and res["num_processes"] == 1
    assert res["eval_loss"] < min(5.6, r[0]["eval_loss"])  # from ln(384) = 5.95 at init: it learned, and kept learning
    assert res["tokens_kept"] == 16 * 4 * 32  # the budget: the tokens the final weights have seen
    events = glob.glob(os.path.join(out, "train", "events.out.tfevents.*"))
    assert events, "TensorBoard wrote no event file"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(events[0]).Reload().Tags()["scalars"]
    assert {"train/loss", "eval/loss", "train/lr", "controller/reward"} <= set(tags), tags
    assert os.path.getsize(os.path.join(out, "run.png")) > 1000
    assert "----- sample -----" in p.stdout
    for line in p.stdout.splitlines():  # console lines go through the progress bar, not onto its line
        assert not ("[controller]" in line and not line.startswith("[controller]")), line
    # the saved model and tokenizer reload and generate
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = model.generate(tok("KING", return_tensors="pt").input_ids, max_new_tokens=5, do_sample=False)
    assert ids.shape[1] > 5


def test_a_run_over_a_previous_one_keeps_none_of_its_logs(tmp_path):
    """--overwrite_output_dir: the second run's metrics, results and TensorBoard log are its own (the previous run's
    event file stayed beside the new one, and TensorBoard drew both runs' curves as one)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = str(tmp_path / "run")
    common = TINY + ["--max_train_steps", "8", "--with_tracking", "--sample_tokens", "0", "--output_dir", out]
    launch(common)
    launch(common + ["--overwrite_output_dir", "--learning_rate", "1e-2"])
    events = glob.glob(os.path.join(out, "train", "events.out.tfevents.*"))
    assert len(events) == 1, events
    logged = [(e.step, e.value) for e in EventAccumulator(events[0]).Reload().Scalars("eval/loss")]
    assert logged == [(x["step"], pytest.approx(x["eval_loss"])) for x in rows(out) if "eval_loss" in x]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert results(out)["_git_commit_hash"] == (head.stdout.strip() or None)  # evaluate.save's, run from ROOT


SEARCH = ["--max_train_steps", "24", "--search_budget", "0.9", "--learning_rate", "1.0"]  # far too high; room to try


def test_rl_search_on_top_or_inside_the_budget_and_memory_or_disk_slots(tmp_path):
    """A start far too high: the rl search runs a trial from the initial weights. The tokens it discards are counted
    apart, on top of the budget by default, inside it with --search_in_budget, never more than the search budget.
    Slots in host memory (default), in the GPU's (here, without one: host memory) or as DeepSpeed checkpoints on disk
    give the same run, bit for bit. The search's decisions fall off the --eval_steps grid (its cooldowns are shorter
    than the interval): each one's evaluation restarts the count, so no grid evaluation follows a decision's a step
    or two later; a decision before a cooldown evaluates nothing (the controller does not read the loss there)."""
    budget, out = 24 * 4 * 32, {}
    runs = [("memory", []), ("disk", ["--controller_slots", "disk"]), ("inside", ["--search_in_budget"])]
    for name, extra in runs + [("device", ["--controller_slots", "device"])]:  # (no GPU: host memory)
        out[name] = str(tmp_path / name)
        p = launch(TINY + SEARCH + ["--output_dir", out[name], *extra])
        assert f"rollback slots: {'disk' if name == 'disk' else 'memory'}" in p.stdout
        assert "initial eval_loss" in p.stdout  # rl judges a plateau by it (and a short run's blow-up)
    a, b = results(out["memory"]), results(out["inside"])
    assert a["initial_eval_loss"] == b["initial_eval_loss"] > 0  # in results.json, for benchmark.py's replays()
    assert a["tokens_kept"] == budget and 0 < a["tokens_discarded"] <= 0.9 * budget and a["rollbacks"] > 0
    assert a["tokens_seen"] == budget + a["tokens_discarded"]
    assert b["tokens_seen"] == budget and b["tokens_kept"] == budget - b["tokens_discarded"] > 0
    actions = [r["controller/action"] for r in rows(out["memory"]) if "controller/action" in r]
    assert "cooldown" in actions and any(x.startswith("trial_x") for x in actions), actions
    evals = [(r["step"], "controller/action" in r) for r in rows(out["memory"]) if "eval_loss" in r]
    assert any(step % 4 for step, decided in evals if decided), evals  # decisions off the grid
    gaps = [s - p for (p, _), (s, decided) in itertools.pairwise(evals[:-1]) if not decided]  # (the last: the end)
    assert all(gap == 4 for gap in gaps), evals  # (here every evaluation but the last is a decision's)
    unread = [r for r in rows(out["memory"]) if "controller/action" in r and "eval_loss" not in r]
    assert unread and all(r["controller/cool"] for r in unread), unread  # a trial's end: the cooled loss decides
    strip = [
        [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows(out[m])] for m in ("memory", "disk", "device")
    ]
    assert strip[0] == strip[1] == strip[2] and a["eval_loss"] == results(out["disk"])["eval_loss"]


def test_two_processes_zero3_memory_slots_match_disk_slots(tmp_path, text_files):
    """Two processes over gloo with ZeRO-3 via accelerate_config.yaml: each rank keeps its own partition in its
    slots; the decisions agree on both ranks (train.py raises otherwise) and match disk slots, also with activation
    checkpointing (the disk run recomputes the blocks' activations in the backward pass: the same numbers); the
    gathered full model loads."""
    train_file, valid_file = text_files
    common = TINY + SEARCH + ["--zero_stage", "3", "--train_file", train_file, "--validation_file", valid_file]
    outs = {}
    for mode, extra in (("memory", []), ("disk", ["--gradient_checkpointing"])):
        outs[mode] = str(tmp_path / mode)
        p = launch(
            common + ["--output_dir", outs[mode], "--controller_slots", mode, *extra],
            processes=2,
            config="accelerate_config.yaml",
        )
        assert ("activation checkpointing" in p.stdout) == bool(extra)
    res = results(outs["memory"])
    assert res["num_processes"] == 2 and res["zero_stage"] == 3 and res["rollbacks"] > 0
    assert res["eval_loss"] == results(outs["disk"])["eval_loss"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(outs["memory"])
    assert sum(p.numel() for p in model.parameters()) > 10000  # a full model, not an empty ZeRO-3 shard


def test_two_processes_count_each_validation_block_once(tmp_path, text_files):
    """5 validation blocks, 4 per batch, 2 processes: Accelerate fills the second rank's batch up with 3 blocks from
    the start (every rank runs the same forwards); the evaluation leaves them out, so the same weights give the same
    loss and accuracy on 1 and 2 processes, at ZeRO-2 and ZeRO-3 (the copies had weighed 3 blocks twice)."""
    from transformers import ByT5Tokenizer, GPT2Config, GPT2LMHeadModel

    model_dir = str(tmp_path / "model")  # weights far from uniform: each block's loss its own
    tok = ByT5Tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=64, vocab_size=len(tok), initializer_range=0.5)
    GPT2LMHeadModel(config).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    valid = tmp_path / "valid.txt"
    valid.write_text("to be or not to be " * 5 + "0123456789 " * 6)  # 162 bytes: 5 blocks of 32
    common = TINY + ["--model_name_or_path", model_dir, "--train_file", text_files[0], "--validation_file", str(valid)]
    common += ["--per_device_train_batch_size", "2", "--max_train_steps", "1", "--learning_rate", "1e-12"]
    common += ["--controller", "off", "--final_eval_batches", "0", "--sample_tokens", "0"]
    one = str(tmp_path / "one")
    p = launch(common + ["--output_dir", one])
    assert "validation blocks = 5" in p.stdout
    for stage in (2, 3):
        two = str(tmp_path / f"two{stage}")
        launch(common + ["--output_dir", two, "--zero_stage", str(stage)], processes=2, config="accelerate_config.yaml")
        assert results(two)["num_processes"] == 2
        assert results(two)["eval_loss"] == pytest.approx(results(one)["eval_loss"], rel=1e-6)
        assert results(two)["accuracy"] == results(one)["accuracy"]


def test_resume_mid_search_restores_the_slots_exactly(tmp_path, text_files):
    """A checkpoint every 3 steps lands inside the rl search (slots held, a measurement under way: that one waits
    for the end of the measurement). Resuming from any of them reproduces the uninterrupted run exactly."""
    train_file, valid_file = text_files
    # on this text the tiny model's first reading calls 1.0 not too high (h < 0); 3.0 it calls too high
    common = TINY + SEARCH + ["--learning_rate", "3.0", "--train_file", train_file, "--validation_file", valid_file]
    full = str(tmp_path / "full")
    launch(common + ["--output_dir", full, "--checkpointing_steps", "3"])
    ref = {r["step"]: r for r in rows(full)}
    with_slots = [n for n in os.listdir(full) if n.startswith("step_") and read_state(full, n)["slots"]]
    assert with_slots
    for name in sorted(with_slots, key=lambda n: int(n[5:]))[:2]:
        resumed = str(tmp_path / f"from_{name}")
        p = launch(common + ["--output_dir", resumed, "--resume_from_checkpoint", os.path.join(full, name)])
        assert "Resuming from" in p.stdout
        for r in rows(resumed):
            assert {k: v for k, v in r.items() if k != "elapsed_s"} == {
                k: v for k, v in ref[r["step"]].items() if k != "elapsed_s"
            }
        assert results(resumed)["eval_loss"] == results(full)["eval_loss"]


def read_state(out, name):
    with open(os.path.join(out, name, "train_state.json")) as f:
        return json.load(f)


def test_checkpoints_store_each_slot_once(tmp_path):
    """A slot that holds the checkpoint's own weights is only referenced; one unchanged since an earlier checkpoint
    is a hard link to that file, not a copy."""
    out = str(tmp_path / "run")
    launch(TINY + SEARCH + ["--output_dir", out, "--checkpointing_steps", "1"])
    tables = {int(n[5:]): read_state(out, n)["slots"] for n in os.listdir(out) if n.startswith("step_")}
    referenced = [(s, name) for s, t in tables.items() for name, e in t.items() if e["same_as_checkpoint"]]
    assert referenced, tables
    for s, name in referenced:
        assert not os.path.exists(os.path.join(out, f"step_{s}", "controller_slots", name))
    inodes = {}
    for s, t in sorted(tables.items()):
        for name, e in t.items():
            f = os.path.join(out, f"step_{s}", "controller_slots", name, "rank_0.pt")
            if not e["same_as_checkpoint"]:
                inodes.setdefault((name, e["weights_id"]), set()).add(os.stat(f).st_ino)
    assert any(len(v) == 1 for v in inodes.values()) and all(len(v) == 1 for v in inodes.values()), inodes
    shared = [
        k
        for k, v in inodes.items()
        if sum(1 for s, t in tables.items() if k[0] in t and t[k[0]]["weights_id"] == k[1]) > 1
    ]
    assert shared  # at least one slot sat in several checkpoints, as one file


@pytest.mark.parametrize("flags", [["--lr_scheduler_type", "constant"], ["--num_warmup_steps", "0"]])
def test_rl_without_warmup_says_it_was_not_measured_there(tmp_path, flags):
    p = launch(TINY + ["--output_dir", str(tmp_path / "run"), "--max_train_steps", "4", *flags])
    assert "Note: rl was measured with a warmup;" in p.stdout
    assert ("rl cools the lr down over the last 20%" in p.stdout) == (flags[0] == "--lr_scheduler_type")
    assert "repeats the data" not in p.stdout  # (a small share of one epoch)


def test_rl_on_data_repeated_many_times_says_it_overfits_unless_capped(tmp_path, text_files):
    """A budget of more than 4 epochs: the banner says what rl did there (8 epochs: +3.6%) and how to cap it; a
    --max_lr given says the user has."""
    small = tmp_path / "small.txt"
    small.write_text(Path(text_files[0]).read_text()[:600])  # ~19 blocks of 32 bytes: 24 steps of 4 are ~5 epochs
    common = TINY + ["--train_file", str(small), "--validation_file", text_files[1], "--max_train_steps", "24"]
    p = launch(common + ["--output_dir", str(tmp_path / "run")])
    epochs = float(re.search(r"= ([0-9.]+) epochs;", p.stdout).group(1))
    assert epochs > 4 and f"Note: the budget repeats the data {epochs:.3g} times" in p.stdout, p.stdout[-2000:]
    p = launch(common + ["--output_dir", str(tmp_path / "capped"), "--max_lr", "3e-3"])
    assert "repeats the data" not in p.stdout


def test_rl_cools_a_flat_schedule_down_at_the_end(tmp_path):
    """train.py passes its schedule's factor to the controller: under a constant lr (after a warmup) the last 20% of
    the run is the controller's linear cooldown, to about a quarter of the lr at the last of 4 steps; the cosine of
    the default run's gets none (test_default_data_one_process_zero2). A resume inside the cooldown ends the same."""
    out = str(tmp_path / "run")
    flags = ["--max_train_steps", "20", "--lr_scheduler_type", "constant_with_warmup", "--num_warmup_steps", "2"]
    flags += ["--learning_rate", "1e-3", "--max_lr", "1e-3"]  # no move up: online from step 4 (the tiny model climbs)
    flags += ["--checkpointing_steps", "4", "--save_total_limit", "2"]
    p = launch(TINY + ["--output_dir", out, *flags])
    assert "rl cools the lr down over the last 20%" in p.stdout and "Note: rl was measured" not in p.stdout
    r = [x for x in rows(out) if "lr" in x]
    cool = [x for x in r if x.get("controller/action") == "final_cooldown"]
    assert len(cool) == 1 and cool[0]["step"] == 16, [(x["step"], x.get("controller/action")) for x in r]
    committed = cool[0]["lr"]  # the lr of step 16, before the cooldown
    floor = 1e-3 / 100 / committed  # the multiplier's floor: the default --min_lr, learning_rate / 100
    assert r[-1]["step"] == 20 and r[-1]["lr"] == pytest.approx(committed * (1 + (floor - 1) * 3 / 4))
    # a resume inside the cooldown (from step 16, after its decision) ends where the uninterrupted run did
    ref = results(out)["eval_loss"]
    shutil.rmtree(os.path.join(out, "step_20"))
    p = launch(TINY + ["--output_dir", out, *flags, "--resume_from_checkpoint", "latest"])
    assert "step_16" in p.stdout and results(out)["eval_loss"] == pytest.approx(ref, rel=1e-6)


def test_local_model_directory_and_json_files(tmp_path):
    """A local model fine-tuned on a .jsonl file. --config_overrides change its config where they keep the weights'
    shapes (here its dropout; they were ignored without a word), and are refused in one line where they do not."""
    sys.path.insert(0, ROOT)
    from transformers import AutoConfig, ByT5Tokenizer, GPT2Config, GPT2LMHeadModel

    import train

    model_dir = tmp_path / "tiny-model"
    tok = ByT5Tokenizer()
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=64, vocab_size=len(tok))).save_pretrained(
        model_dir
    )
    tok.save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    data.write_text(
        "\n".join(json.dumps({"text": f"Line {i}: to be, or not to be, that is the question."}) for i in range(400))
    )
    out = str(tmp_path / "run")
    launch(
        TINY
        + [
            "--output_dir",
            out,
            "--model_name_or_path",
            str(model_dir),
            "--train_file",
            str(data),
            "--controller",
            "off",
            "--config_overrides",
            "resid_pdrop=0.2",
        ]
    )
    res = results(out)
    assert res["controller"] == "off" and res["steps"] == 16
    assert "controller/action" not in rows(out)[0]
    assert AutoConfig.from_pretrained(out).resid_pdrop == 0.2
    for overrides, expected in [("n_layer=2", "12 missing tensors"), ("n_embd=64", "sizes that do not match")]:
        with pytest.raises(SystemExit) as e:
            train.build_model_and_tokenizer(
                train.parse_args(["--model_name_or_path", str(model_dir), "--config_overrides", overrides])
            )
        msg = str(e.value.code)
        assert msg.startswith("train.py: error: --config_overrides") and "\n" not in msg and expected in msg, msg


def test_a_model_with_its_own_code_trains_with_trust_remote_code(tmp_path):
    """A model whose classes are Python code in its directory (a type transformers does not know, as hub models with
    their own code are) trains with --trust_remote_code; the saved model carries that code and loads with it. Without
    the flag it is refused in one line (tests/test_reliability.py)."""
    from transformers import AutoModelForCausalLM

    model_dir = custom_code_model(tmp_path / "custom")
    out = str(tmp_path / "run")
    flags = ["--model_name_or_path", model_dir, "--trust_remote_code", "--max_train_steps", "4"]
    p = launch(TINY + ["--output_dir", out, *flags])
    assert results(out)["steps"] == 4 and "----- sample -----" in p.stdout  # the sample reloads the saved model
    assert os.path.exists(os.path.join(out, "modeling_tiny_custom.py"))
    assert type(AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)).__name__ == "TinyCustomForCausalLM"


def test_a_llama_from_scratch_with_model_type(tmp_path):
    """--model_type takes a transformers type's default config, sized by --config_overrides, its vocabulary the
    tokenizer's (bytes here: 384, not Llama's 32,000): rl searches, and the saved model reloads as that type."""
    from transformers import AutoModelForCausalLM

    out = str(tmp_path / "llama")
    sizes = "hidden_size=32,intermediate_size=64,num_hidden_layers=1,num_attention_heads=2,num_key_value_heads=2"
    launch(TINY + ["--output_dir", out, "--model_type", "llama", "--config_overrides", sizes])
    assert results(out)["controller"] == "rl" and any("controller/action" in r for r in rows(out))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 384
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 1


def test_config_overrides_go_to_the_config_constructor(tmp_path):
    """A from-scratch config gets --config_overrides in its constructor, which derives what depends on them: a Qwen2
    of 2 layers has 2 per-layer types (set after construction it kept its default's 32, and save_pretrained refused
    the config once the whole run had trained), a Llama 64 wide with 4 heads has heads 16 wide (not its default's
    128); the default GPT-2 takes them as before (a combination the config refuses: test_reliability). A type's own
    padding id becomes the tokenizer's (Phi-3's 32000, past the byte vocabulary, failed to build; CodeGen's config
    has no padding id at all). Saved, each reloads as a model to fine-tune with the same byte tokenizer."""
    sys.path.insert(0, ROOT)
    from transformers import AutoConfig

    import train

    qwen = "hidden_size=64,intermediate_size=128,num_hidden_layers=2,num_attention_heads=4,num_key_value_heads=4"
    no_pad = lambda c: getattr(c, "pad_token_id", None) is None
    for flags, check in [
        (["--model_type", "qwen2", "--config_overrides", qwen], lambda c: len(c.layer_types) == 2),
        (["--model_type", "llama", "--config_overrides", qwen], lambda c: (c.head_dim, c.hidden_size) == (16, 64)),
        (["--model_type", "phi3", "--config_overrides", qwen], lambda c: c.pad_token_id == 0),  # the bytes' padding
        (["--model_type", "codegen", "--config_overrides", "n_embd=64,n_layer=1,n_head=4,rotary_dim=16"], no_pad),
        (["--config_overrides", "n_layer=1,n_embd=32,n_head=2"], lambda c: (c.n_layer, c.n_embd) == (1, 32)),
    ]:
        model, tokenizer = train.build_model_and_tokenizer(train.parse_args(flags))
        model.save_pretrained(tmp_path / flags[1])  # where the refusal came, after training
        tokenizer.save_pretrained(tmp_path / flags[1])
        assert check(AutoConfig.from_pretrained(tmp_path / flags[1])), flags
        # a local "pretrained" model to fine-tune: its tokenizer comes back as bytes (transformers 5's AutoTokenizer
        # takes Qwen2's and Phi-3's own tokenizer for those types, which turned every text into no tokens at all)
        _, again = train.build_model_and_tokenizer(train.parse_args(["--model_name_or_path", str(tmp_path / flags[1])]))
        assert list(train.encode(again, ["To be"])[0]) == [87, 114, 35, 101, 104, 1], (flags, type(again).__name__)


def test_the_sample_stays_within_the_models_positions(tmp_path):
    """An MPT whose positions (its max_seq_len) are --block_size trains, saves and then samples only as many tokens
    as fit: the sample asked for more, and generation ran past the positions with a traceback after the run."""
    mpt = ["--model_type", "mpt", "--config_overrides", "d_model=32,n_layers=1,n_heads=2,max_seq_len=32"]
    out = str(tmp_path / "mpt")
    p = launch(TINY + mpt + ["--max_train_steps", "4", "--sample_tokens", "64", "--output_dir", out])
    assert "----- sample -----" in p.stdout and results(out)["steps"] == 4


def test_a_budget_in_epochs_when_only_num_train_epochs_is_given(tmp_path):
    """--num_train_epochs alone sets the budget, and --max_train_steps, when given, overrides it (as in transformers'
    scripts); with neither, the default run's 400 steps. A lone train file gives up --validation_split_percentage of
    its blocks to the validation split. --checkpointing_steps epoch saves at each epoch's end. The banner names the
    controller's line by policy."""
    sys.path.insert(0, ROOT)
    import train

    for argv, steps, epochs in [([], 400, 1), (["--num_train_epochs", "3"], 0, 3), (["--max_train_steps", "7"], 7, 1)]:
        args = train.parse_args(argv)
        assert (args.max_train_steps, args.num_train_epochs) == (steps, epochs)
    data = tmp_path / "small.txt"
    data.write_text("\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog" for i in range(60)))
    i = TINY.index("--max_train_steps")
    common = TINY[:i] + TINY[i + 2 :] + ["--train_file", str(data), "--validation_split_percentage", "20"]
    common += ["--controller", "off"]
    for extra, steps in [(["--num_train_epochs", "2"], 40), (["--num_train_epochs", "2", "--max_train_steps", "5"], 5)]:
        out = str(tmp_path / f"run{steps}")
        p = launch(common + extra + ["--output_dir", out, "--checkpointing_steps", "epoch"])
        assert "train blocks = 80, validation blocks = 20" in p.stdout
        assert f"Budget = {steps} steps" in p.stdout and "Controller off: the lr follows the schedule alone" in p.stdout
        assert results(out)["steps"] == steps
        # a checkpoint at each epoch's end (20 steps of 4 blocks), as transformers' --checkpointing_steps epoch
        saved = sorted(int(d.split("_")[1]) for d in os.listdir(out) if d.startswith("step_"))
        assert saved == ([20, 40] if steps == 40 else []), saved


def test_tokenising_in_several_processes_gives_the_same_blocks(tmp_path, capfd):
    """--preprocessing_num_workers tokenises in that many processes (datasets' num_proc) and the blocks are the same
    as one process's: grouping into blocks runs in one, so shard boundaries do not cut the text apart."""
    sys.path.insert(0, ROOT)
    from accelerate import Accelerator
    from transformers import ByT5Tokenizer

    import train

    data = tmp_path / "lines.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"Line {i}: " + "to be, or not " * (i % 7)}) for i in range(3000)))
    blocks = []
    for workers in ([], ["--preprocessing_num_workers", "3"]):
        args = train.parse_args(["--train_file", str(data), "--overwrite_cache", *workers])
        splits = train.build_datasets(args, ByT5Tokenizer(), Accelerator(cpu=True))
        blocks.append([s[:]["input_ids"].tolist() for s in splits])
    assert "tokenize (num_proc=3)" in capfd.readouterr().err  # the map really ran in 3 processes
    assert len(blocks[0][0]) > 1000 and blocks[1] == blocks[0]


def test_a_txt_file_keeps_its_line_breaks_unless_asked(tmp_path):
    """A .txt line is one text with its line break, as in transformers' run_clm_no_trainer.py (blank lines skipped);
    --no_keep_linebreaks drops the breaks. The validation file goes through the same loader."""
    sys.path.insert(0, ROOT)
    from accelerate import Accelerator
    from transformers import ByT5Tokenizer

    import train

    tok = ByT5Tokenizer()
    lines = [f"Line {i}: to be, or not to be." for i in range(200)]
    train_txt, valid_txt = tmp_path / "t.txt", tmp_path / "v.txt"
    train_txt.write_text("\n\n".join(lines[:150]) + "\n")
    valid_txt.write_text("\n".join(lines[150:]))  # the last line has no break to keep
    for flags, ends in [([], "\n"), (["--no_keep_linebreaks"], "")]:
        args = train.parse_args(["--train_file", str(train_txt), "--validation_file", str(valid_txt), *flags])
        got = [s[:]["input_ids"].flatten().tolist() for s in train.build_datasets(args, tok, Accelerator(cpu=True))]
        want = [
            [i for t in texts for i in tok(t)["input_ids"]]
            for texts in ([t + ends for t in lines[:150]], [t + ends for t in lines[150:-1]] + [lines[-1]])
        ]
        assert got == [w[: len(w) // 128 * 128] for w in want]


def test_byte_ids_are_the_tokenizers_own():
    """train.py computes the default tokenizer's (ByT5's) ids from the UTF-8 bytes, and leaves a text that holds a
    special token's string to the tokenizer: the ids are the tokenizer's own either way."""
    sys.path.insert(0, ROOT)
    from transformers import ByT5Tokenizer

    import train

    tok = ByT5Tokenizer()
    texts = ["Ophélie 🌍 ends", "a</s>b<pad>c<extra_id_7>d", "\x00\x7f <unk", "".join(map(chr, range(1, 3000)))]
    assert [list(map(int, ids)) for ids in train.encode(tok, texts)] == tok(texts)["input_ids"]


def test_a_run_never_costs_more_than_one_plus_the_search_budget():
    """The history's end: the budget; less the discarded tokens with --search_in_budget; else less those beyond
    --search_budget (a restart after a tie discards the first segment too), so a run spends at most 1.10x."""
    sys.path.insert(0, ROOT)
    import train

    s = train.TrainState(1000, False, 0.1, 1, 1e-3, {})
    s.tokens_spent, s.model_tokens = 300, 200  # 100 discarded: within the search budget
    assert s.end == 1000
    s.tokens_spent, s.model_tokens = 340, 200  # 140 discarded: 40 beyond it
    assert s.end == 960 and s.end + 140 == 1100
    s.search_in_budget = True
    assert s.end == 860


def test_accumulation_change_keeps_the_gradient_scale():
    """set_grad_accum changes DeepSpeed and Accelerate together: the gradient after a change from 1 to 2
    is the mean over 2 micro-batches x 2 processes, as if accumulation 2 had been used from the start."""
    cmd = launch_cmd("tests/accum_check.py", 2, "accelerate_config.yaml")
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0 and "ACCUM OK" in p.stdout, p.stdout[-2000:] + p.stderr[-3000:]


def launch_two_nodes(cwd, flags, node1_prefix=()):
    """Two "nodes" on this machine, each started as the README's multi-node command (accelerate_config.yaml,
    --num_machines 2, its own --machine_rank, rank 0's address and port); node 1's command after node1_prefix.
    The return codes and the last of what each said."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    nodes = []
    for rank in ("0", "1"):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"{ROOT}/accelerate_config.yaml"]
        cmd += ["--num_machines", "2", "--num_processes", "2", "--machine_rank", rank]
        cmd += ["--main_process_ip", "127.0.0.1", "--main_process_port", port, f"{ROOT}/train.py", *flags]
        cmd = [*node1_prefix, *cmd] if rank == "1" else cmd
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        nodes.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    said = [node.communicate(timeout=300)[0].decode()[-3000:] for node in nodes]
    return [node.returncode for node in nodes], said


def test_two_nodes_launched_as_the_readme_says_train_as_one_run(tmp_path):
    """Two "nodes" on this machine, launched as the README says: one run of 2 processes. Without
    `deepspeed_multinode_launcher: standard` in the config, Accelerate's default (pdsh, which wants a hostfile) failed
    on node 1 and ran node 0 alone as a one-process run that said nothing. (Their --output_dir is shared: the check
    that it is passes.)"""
    out = str(tmp_path / "run")
    codes, said = launch_two_nodes(
        tmp_path, [*TINY, "--max_train_steps", "4", "--sample_tokens", "0", "--output_dir", out]
    )
    assert codes == [0, 0], said
    res = results(out)
    assert res["num_processes"] == 2 and res["tokens_seen"] == 2 * 4 * 4 * 32, res
    assert not os.path.exists(tmp_path / ".deepspeed_env")  # (pdsh's launcher wrote the environment there)
    assert not glob.glob(str(tmp_path / "**" / ".shared_check_*"), recursive=True)  # the check's file is gone


def test_two_nodes_whose_output_dir_is_not_shared_are_refused(tmp_path):
    """Node 1 sees its own disk where node 0 sees --output_dir's parent (its own mount namespace: a bind mount over
    the directory). Its shards of every checkpoint would stay in step_N.tmp, which rank 0 renames on its own disk
    only: a resume could not find them. Both nodes stop at the start with one line that names the flag."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True, check=False).returncode:
        pytest.skip("no mount namespace here (unshare -m needs root or user namespaces)")
    shared, own = tmp_path / "shared", tmp_path / "node1_disk"
    shared.mkdir()
    own.mkdir()
    out = str(shared / "run")
    node1 = ["unshare", "-m", "--propagation", "private", "sh", "-c", 'mount --bind "$0" "$1" && shift && exec "$@"']
    node1 += [str(own), str(shared)]
    flags = [*TINY, "--max_train_steps", "4", "--sample_tokens", "0", "--output_dir", out]
    codes, said = launch_two_nodes(tmp_path, flags, node1)
    assert codes[0] != 0 and codes[1] != 0, said
    for text in said:
        assert (
            f"train.py: error: --output_dir {out!r} is not on storage every node shares: rank(s) 1 do not see" in text
        ), text
    assert not os.listdir(shared) and not os.listdir(own)  # nothing written, the check's file removed


def test_two_processes_controller_changes_lr_and_accumulation_identically(tmp_path, text_files):
    """The `seed` policy moves the lr and the accumulation from the first rewards (a positive one raises the lr and
    shrinks the batch); with two processes every decision is computed on both ranks and compared (train.py raises
    on a mismatch)."""
    out = str(tmp_path / "run")
    train_file, valid_file = text_files
    launch(
        TINY
        + [
            "--output_dir",
            out,
            "--train_file",
            train_file,
            "--validation_file",
            valid_file,
            "--controller",
            "seed",
            "--max_train_steps",
            "24",
            "--gradient_accumulation_steps",
            "2",
            "--min_gradient_accumulation_steps",
            "1",
        ],
        processes=2,
        config="accelerate_config.yaml",
    )
    decisions = [r for r in rows(out) if "controller/action" in r]
    assert {r["controller/grad_accum"] for r in decisions} - {2}, decisions  # the batch changed
    assert any(r["controller/lr_scale"] != 1.0 for r in decisions), decisions  # the lr changed
    assert {r["effective_batch_size"] for r in rows(out)} - {16}  # 4 x 2 processes x 2 at the start
    assert results(out)["tokens_kept"] == 24 * 2 * 4 * 32 * 2  # the budget is tokens, whatever the batch


@pytest.mark.parametrize("stage", [0, 1])
def test_memory_slots_at_zero_stage(tmp_path, stage):
    """Memory slots at ZeRO stages 0 and 1 (the module and the torch optimizer; the ZeRO-1 partition) match disk.
    The banner's size of a slot (what decides memory or disk) is that of one saved after steps, AdamW's moments
    included, although the optimizer has none yet when it is printed (it printed a third of it at ZeRO 1)."""
    common = TINY + SEARCH + ["--zero_stage", str(stage)]
    out = {m: str(tmp_path / m) for m in ("memory", "disk")}
    for mode, path in out.items():
        p = launch(common + ["--output_dir", path, "--controller_slots", mode, "--checkpointing_steps", "2"])
        if mode == "memory":
            banner = float(p.stdout.split("rollback slots: memory, ")[1].split(" MB per slot")[0]) * 2**20
    assert results(out["memory"])["rollbacks"] > 0
    assert results(out["memory"])["eval_loss"] == results(out["disk"])["eval_loss"]
    files = glob.glob(os.path.join(out["memory"], "step_*", "controller_slots", "*", "rank_0.pt"))
    assert 0.9 * banner < max(map(os.path.getsize, files)) < 1.15 * banner, (banner, files)
