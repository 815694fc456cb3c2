"""Smoke runs of the real script through `accelerate launch`, with a tiny model and a few steps.

Run: python -m pytest -q tests/test_train.py      (about 5 minutes on 2 CPU cores)
"""

import glob
import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT, TINY, launch, results, rows


def test_default_data_one_process_zero2(tmp_path):
    """Plain `accelerate launch train.py` (no config file): DeepSpeed ZeRO-2 on the shipped plays."""
    out = str(tmp_path / "run")
    p = launch(TINY + ["--output_dir", out, "--with_tracking"])
    assert "Running training" in p.stdout and "ZeRO-2" in p.stdout
    assert "[controller] step 4" in p.stdout
    r = rows(out)
    keys = {
        "step",
        "tokens_seen",
        "train_loss",
        "eval_loss",
        "perplexity",
        "accuracy",
        "lr",
        "effective_batch_size",
        "elapsed_s",
    }
    assert keys <= set(r[0]) and [x["step"] for x in r] == [4, 8, 12, 16]
    res = results(out)
    assert {
        "eval_loss",
        "perplexity",
        "accuracy",
        "steps",
        "tokens_seen",
        "wall_s",
        "train_tokens_per_s",
        "peak_memory_mb",
    } <= set(res)
    assert res["zero_stage"] == 2 and res["num_processes"] == 1
    assert res["eval_loss"] < min(5.6, r[0]["eval_loss"])  # from ln(384) = 5.95 at init: it learned, and kept learning
    assert res["tokens_seen"] == 16 * 4 * 32
    events = glob.glob(os.path.join(out, "train", "events.out.tfevents.*"))
    assert events, "TensorBoard wrote no event file"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(events[0]).Reload().Tags()["scalars"]
    assert {"train/loss", "eval/loss", "train/lr", "controller/reward"} <= set(tags), tags
    assert os.path.getsize(os.path.join(out, "run.png")) > 1000
    assert "----- sample -----" in p.stdout
    # the saved model and tokenizer reload and generate
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = model.generate(tok("KING", return_tensors="pt").input_ids, max_new_tokens=5, do_sample=False)
    assert ids.shape[1] > 5


def test_two_processes_zero3_local_text_files(tmp_path, text_files):
    """Two processes over gloo with ZeRO-3 via accelerate_config.yaml; the controller's decisions must agree
    on both ranks (train.py raises otherwise) and the gathered full model must load."""
    out = str(tmp_path / "run")
    train_file, valid_file = text_files
    launch(
        TINY
        + [
            "--output_dir",
            out,
            "--zero_stage",
            "3",
            "--train_file",
            train_file,
            "--validation_file",
            valid_file,
            "--controller",
            "rl",
            "--controller_seed",
            "1",
        ],
        processes=2,
        config="accelerate_config.yaml",
    )
    res = results(out)
    assert res["num_processes"] == 2 and res["zero_stage"] == 3
    assert res["tokens_seen"] == 16 * 4 * 32 * 2
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) > 10000  # a full model, not an empty ZeRO-3 shard


def test_resume_reproduces_the_uninterrupted_run(tmp_path, text_files):
    train_file, valid_file = text_files
    common = TINY + [
        "--max_train_steps",
        "24",
        "--train_file",
        train_file,
        "--validation_file",
        valid_file,
        "--controller",
        "rl",
        "--controller_seed",
        "4",
        "--max_gradient_accumulation_steps",
        "4",
    ]
    full = str(tmp_path / "full")
    launch(common + ["--output_dir", full, "--checkpointing_steps", "12"])
    assert os.path.isfile(os.path.join(full, "step_12", "train_state.json"))
    resumed = str(tmp_path / "resumed")
    p = launch(common + ["--output_dir", resumed, "--resume_from_checkpoint", os.path.join(full, "step_12")])
    assert "Resuming from" in p.stdout
    a = [r for r in rows(full) if r["step"] > 12]
    b = rows(resumed)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [16, 20, 24]
    for x, y in zip(a, b):
        assert y["eval_loss"] == pytest.approx(x["eval_loss"], rel=1e-5)
        assert y["lr"] == pytest.approx(x["lr"], rel=1e-9)
        assert y["effective_batch_size"] == x["effective_batch_size"]
        assert y.get("controller/action") == x.get("controller/action")
    assert results(resumed)["eval_loss"] == pytest.approx(results(full)["eval_loss"], rel=1e-5)


def test_local_model_directory_and_json_files(tmp_path):
    from transformers import ByT5Tokenizer, GPT2Config, GPT2LMHeadModel

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
        ]
    )
    res = results(out)
    assert res["controller"] == "off" and res["steps"] == 16
    assert "controller/action" not in rows(out)[0]


def test_accumulation_change_keeps_the_gradient_scale():
    """set_grad_accum changes DeepSpeed and Accelerate together: the gradient after a change from 1 to 2
    is the mean over 2 micro-batches x 2 processes, as if accumulation 2 had been used from the start."""

    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        os.path.join(ROOT, "accelerate_config.yaml"),
        "--num_processes",
        "2",
        os.path.join(ROOT, "tests", "accum_check.py"),
    ]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0 and "ACCUM OK" in p.stdout, p.stdout[-2000:] + p.stderr[-3000:]


def test_two_processes_controller_changes_lr_and_accumulation_identically(tmp_path, text_files):
    """The `seed` policy moves both the lr and the accumulation from the first improvements; with two
    processes every decision is computed on both ranks and compared (train.py raises on a mismatch)."""
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
        ],
        processes=2,
        config="accelerate_config.yaml",
    )
    decisions = [r for r in rows(out) if "controller/action" in r]
    assert {r["controller/grad_accum"] for r in decisions} - {1}, decisions  # the batch changed
    assert any(r["controller/lr_scale"] != 1.0 for r in decisions), decisions  # the lr changed
    assert {r["effective_batch_size"] for r in rows(out)} - {8}  # 4 x 2 processes at the start
    assert results(out)["tokens_seen"] == 24 * 4 * 32 * 2  # the budget is tokens, whatever the batch
