"""Faults, bad input, interruption: what a user is promised in the README's "Failure behaviour".

Run: python -m pytest -q tests/test_reliability.py      (about 4 minutes on 2 CPU cores)
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers import ROOT, TINY, launch, results, rows

sys.path.insert(0, ROOT)
import train


# ---------------------------------------------------------------- bad input: one line, non-zero exit, nothing touched
@pytest.fixture
def previous_run(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"eval_loss": 1.0}')
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    return out


def bad_ds(tmp_path, content):
    p = tmp_path / "ds.json"
    p.write_text(content)
    return str(p)


BAD = [
    (lambda t: ["--train_file", str(t / "missing.txt")], "--train_file"),
    (lambda t: ["--train_file", str(t / "empty.txt")], "is empty"),
    (lambda t: ["--train_file", str(t)], "not a readable file"),
    (lambda t: ["--train_file", str(t / "data.parquet")], "must end in"),
    (lambda t: ["--controller", "magic"], "--controller"),
    (lambda t: ["--optimizer", "sgd"], "--optimizer"),
    (lambda t: ["--min_lr", "1e-2", "--max_lr", "1e-3"], "--min_lr"),
    (lambda t: ["--min_lr", "-1"], "--min_lr"),
    (lambda t: ["--min_gradient_accumulation_steps", "4", "--max_gradient_accumulation_steps", "2"], "accumulation"),
    (lambda t: ["--gradient_accumulation_steps", "8", "--max_gradient_accumulation_steps", "4"], "accumulation"),
    (lambda t: ["--controller_interval", "0"], "--controller_interval"),
    (lambda t: ["--per_device_train_batch_size", "0"], "--per_device_train_batch_size"),
    (lambda t: ["--learning_rate", "0"], "--learning_rate"),
    (lambda t: ["--learning_rate", "nan"], "--learning_rate"),
    (lambda t: ["--deepspeed_config", bad_ds(t, "{not json")], "--deepspeed_config"),
    (lambda t: ["--deepspeed_config", bad_ds(t, '{"optimizer": {"type": "AdamW"}}')], "defines 'optimizer'"),
    (lambda t: ["--deepspeed_config", bad_ds(t, '{"train_micro_batch_size_per_gpu": 4}')], 'must be "auto"'),
    (lambda t: ["--deepspeed_config", bad_ds(t, '{"zero_optimization": {"stage": 7}}')], "stage"),
    (lambda t: ["--deepspeed_config", str(t / "nope.json")], "--deepspeed_config"),
    (lambda t: ["--optimizer", "schedulefree"], "--zero_stage 0"),
    (lambda t: ["--resume_from_checkpoint", str(t / "step_9")], "--resume_from_checkpoint"),
    (lambda t: ["--resume_from_checkpoint", "latest"], "no complete step_N"),
    (lambda t: ["--model_name_or_path", str(t)], "not a model directory"),
]


@pytest.mark.parametrize("make_args,expected", BAD, ids=[e for _, e in BAD])
def test_bad_input_is_refused_in_one_line_before_any_work(tmp_path, previous_run, make_args, expected, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "data.parquet").write_text("x")
    before = {p: p.read_text() for p in previous_run.iterdir()}
    with pytest.raises(SystemExit) as e:
        train.main(["--output_dir", str(previous_run), "--overwrite_output_dir", *make_args(tmp_path)])
    msg = str(e.value.code)
    assert msg.startswith("train.py: error:") and "\n" not in msg and expected in msg, msg
    assert {p: p.read_text() for p in previous_run.iterdir()} == before  # nothing on disk touched


def test_previous_run_is_not_overwritten_without_the_flag(previous_run):
    before = {p: p.read_text() for p in previous_run.iterdir()}
    with pytest.raises(SystemExit) as e:
        train.main(["--output_dir", str(previous_run)])
    assert "--overwrite_output_dir" in str(e.value.code)
    assert {p: p.read_text() for p in previous_run.iterdir()} == before


def test_incompatible_checkpoint_is_refused(tmp_path):
    ckpt = tmp_path / "out" / "step_4"
    ckpt.mkdir(parents=True)
    sig = train.run_signature(train.parse_args([])) | {"block_size": 64}
    (ckpt / "train_state.json").write_text(json.dumps({"train": {"signature": sig}}))
    with pytest.raises(SystemExit) as e:
        train.main(["--output_dir", str(tmp_path / "out"), "--resume_from_checkpoint", "latest"])
    assert "incompatible run: block_size was 64, now 128" in str(e.value.code)


def test_block_size_larger_than_the_data(tmp_path):
    f = tmp_path / "tiny.txt"
    f.write_text("To be, or not to be.\n" * 3)
    p = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), "--train_file", str(f), "--output_dir", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert p.returncode != 0
    assert "fewer than --block_size=128 tokens" in p.stderr.strip().splitlines()[-1]


# ---------------------------------------------------------------- non-finite losses never reach the weights
def fault_launch(tmp_path, env, extra, processes=1, check=True):
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes)]
    cmd += ["--config_file", os.path.join(ROOT, "accelerate_config.yaml")] if processes > 1 else []
    cmd += [os.path.join(ROOT, "tests", "faulty_run.py"), *TINY, "--output_dir", out, *extra]
    p = subprocess.run(
        cmd, cwd=ROOT, env=dict(os.environ, **env), capture_output=True, text=True, timeout=600, check=False
    )
    if check and p.returncode != 0:
        raise AssertionError(p.stdout[-3000:] + p.stderr[-3000:])
    return out, p


def assert_finite_model(out):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_isolated_nonfinite_steps_are_skipped(tmp_path, kind):
    out, p = fault_launch(tmp_path, {"FAULT_CALLS": "6,11", "FAULT_KIND": kind}, ["--controller", "rl"])
    assert p.stdout.count("update skipped") == 2
    res = results(out)
    assert res["nonfinite_steps"] == 2
    assert res["eval_loss"] < 5.9  # below ln(384) = 5.95 at init: still learning
    assert_finite_model(out)
    # the controller saw it: the decision after the fault earned the strong negative reward
    decisions = [r for r in rows(out) if "controller/reward" in r]
    assert any(r["controller/reward"] == -1.0 for r in decisions)


def test_consecutive_nonfinite_steps_roll_back_and_lower_the_lr(tmp_path):
    out, p = fault_launch(tmp_path, {"FAULT_CALLS": "9,10,11"}, ["--controller", "plateau"])
    events = [r for r in rows(out) if r.get("event") == "nonfinite_rollback"]
    assert len(events) == 1, p.stdout[-2000:]
    assert events[0]["controller/load"] == "best" and events[0]["controller/lr_scale"] == 0.5
    assert results(out)["nonfinite_steps"] == 3
    assert_finite_model(out)


def test_consecutive_nonfinite_steps_without_controller_stop_cleanly(tmp_path):
    _, p = fault_launch(tmp_path, {"FAULT_CALLS": "5,6,7"}, ["--controller", "off"], check=False)
    assert p.returncode != 0
    assert "3 consecutive non-finite steps at step 7" in p.stderr


def test_fault_on_one_rank_only_is_handled_on_both(tmp_path):
    out, p = fault_launch(tmp_path, {"FAULT_CALLS": "6", "FAULT_RANK": "1"}, ["--controller", "rl"], processes=2)
    assert "[fault] rank 1 call 6" in p.stdout
    res = results(out)
    assert res["nonfinite_steps"] == 1 and res["num_processes"] == 2
    assert_finite_model(out)


# ---------------------------------------------------------------- interruption: SIGKILL at any moment, then resume
def test_sigkill_then_resume_reaches_the_uninterrupted_result(tmp_path, text_files):
    train_file, valid_file = text_files
    common = TINY + [
        "--max_train_steps",
        "20",
        "--train_file",
        train_file,
        "--validation_file",
        valid_file,
        "--controller",
        "rl",
        "--controller_seed",
        "2",
        "--checkpointing_steps",
        "4",
        "--save_total_limit",
        "2",
    ]
    ref = str(tmp_path / "ref")
    launch(common + ["--output_dir", ref])
    last = results(ref)["steps"]  # the budget is in tokens: batch-size changes move the last step
    newest = [f"step_{s}" for s in range(4, last + 1, 4)][-2:]
    assert sorted(n for n in os.listdir(ref) if n.startswith("step_")) == sorted(newest)  # --save_total_limit 2

    out = str(tmp_path / "killed")
    # kill 1: while step_8 is being written (its .tmp exists); kill 2: right after step_16 is complete
    for wait_for in ("step_8.tmp", "step_16"):
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--num_processes",
            "1",
            os.path.join(ROOT, "train.py"),
            *common,
            "--output_dir",
            out,
            "--overwrite_output_dir",
        ]
        if os.path.isdir(os.path.join(out, "step_4")) or os.path.isdir(os.path.join(out, "step_8")):
            cmd[cmd.index("--overwrite_output_dir")] = "--resume_from_checkpoint=latest"
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.time() + 300
        marks = [
            os.path.join(out, wait_for),
            os.path.join(out, wait_for.removesuffix(".tmp")),
        ]  # if the save was too quick to see
        while not any(os.path.exists(m) for m in marks) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not os.path.exists(os.path.join(out, "results.json")), "the run finished before the kill"
    # a half-written checkpoint is never taken for a complete one
    os.makedirs(os.path.join(out, "step_99.tmp"), exist_ok=True)
    os.makedirs(os.path.join(out, "step_98"), exist_ok=True)  # no train_state.json: incomplete
    p = launch(common + ["--output_dir", out, "--resume_from_checkpoint", "latest"])
    assert "Resuming from" in p.stdout and "step_16" in p.stdout
    assert results(out)["eval_loss"] == pytest.approx(results(ref)["eval_loss"], rel=1e-5)
    a = {r["step"]: r for r in rows(ref)}
    for r in rows(out):
        if r["step"] > 16:
            assert r["eval_loss"] == pytest.approx(a[r["step"]]["eval_loss"], rel=1e-5)
            assert r.get("controller/action") == a[r["step"]].get("controller/action")
    shutil.rmtree(out)
