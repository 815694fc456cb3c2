"""Faults, bad input, interruption: what a user is promised in the README's "Failure behaviour".

Run: python -m pytest -q tests/test_reliability.py      (about 6 minutes on 2 CPU cores)
"""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from helpers import ROOT, TINY, custom_code_model, error_lines, launch, launch_cmd, results, rows

sys.path.insert(0, ROOT)
import train

GATHER = "stage3_gather_16bit_weights_on_model_save"


# ---------------------------------------------------------------- bad input: one line, non-zero exit, nothing touched
@pytest.fixture
def previous_run(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"eval_loss": 1.0}')
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    return out


def snapshot(path):
    """Every file under path with its content: 'nothing on disk changed' is this, unchanged."""
    out = {}
    for d, _, names in os.walk(path):
        for n in names:
            with open(os.path.join(d, n), "rb") as f:
                out[os.path.join(d, n)] = f.read()
    return out


def write(tmp_path, name, content):
    p = tmp_path / name
    p.write_bytes(content) if isinstance(content, bytes) else p.write_text(content)
    return str(p)


# checked before any model, data or process group is built (in-process, fast)
BAD = [
    (lambda t: ["--train_file", str(t / "missing.txt")], "--train_file"),
    (lambda t: ["--train_file", write(t, "empty.txt", "")], "is empty"),
    (lambda t: ["--train_file", str(t)], "not a readable file"),
    (lambda t: ["--train_file", write(t, "data.parquet", "x")], "must end in"),
    (lambda t: ["--train_file", write(t, "latin1.txt", "caf\xe9\n".encode("latin-1"))], "is not UTF-8 text"),
    (
        lambda t: ["--train_file", write(t, "a.txt", "x\n"), "--validation_file", write(t, "b.jsonl", '{"text": "y"}')],
        "is not in the format of --train_file",
    ),
    (lambda t: ["--no_keep_linebreaks", "--train_file", write(t, "c.csv", "text\nx\n")], "--no_keep_linebreaks"),
    (  # (the dataset alone trained: the file was ignored)
        lambda t: ["--dataset_name", str(t), "--train_file", write(t, "d.txt", "x\n")],
        "give one of them, not both",
    ),
    (
        lambda t: ["--dataset_config_name", "wikitext-2-raw-v1"],
        "--dataset_config_name 'wikitext-2-raw-v1' needs --dataset_name",
    ),
    (lambda t: ["--controller", "magic"], "--controller"),
    (lambda t: ["--optimizer", "sgd"], "--optimizer"),
    (lambda t: ["--min_lr", "1e-2", "--max_lr", "1e-1"], "--min_lr"),
    (lambda t: ["--max_lr", "1e-3"], "--learning_rate (0.003) <= --max_lr"),
    (lambda t: ["--min_lr", "-1"], "--min_lr"),
    (lambda t: ["--min_gradient_accumulation_steps", "4", "--max_gradient_accumulation_steps", "2"], "accumulation"),
    (lambda t: ["--gradient_accumulation_steps", "8", "--max_gradient_accumulation_steps", "4"], "accumulation"),
    (lambda t: ["--controller_interval", "0"], "--controller_interval"),
    (lambda t: ["--controller_trial_steps", "0"], "--controller_trial_steps"),
    (lambda t: ["--per_device_train_batch_size", "0"], "--per_device_train_batch_size"),
    (lambda t: ["--block_size", "1"], "--block_size must be at least 2 tokens"),
    (lambda t: ["--with_tracking", "--report_to", "foo"], "--report_to 'foo' is not a tracker: one of all, "),
    (lambda t: ["--with_tracking", "--report_to", "aim"], "--report_to aim: its package is not installed"),
    (lambda t: ["--preprocessing_num_workers", "0"], "--preprocessing_num_workers"),
    (lambda t: ["--learning_rate", "0"], "--learning_rate"),
    (lambda t: ["--learning_rate", "nan"], "--learning_rate"),
    (lambda t: ["--seed", "-1"], "--seed"),
    (lambda t: ["--cpu_threads", "-1"], "--cpu_threads"),
    (lambda t: ["--sample_tokens", "-5"], "--sample_tokens"),
    (lambda t: ["--weight_decay", "nan"], "--weight_decay"),
    (lambda t: ["--weight_decay", "-0.1"], "--weight_decay"),
    (lambda t: ["--search_budget", "1.5"], "--search_budget"),
    (lambda t: ["--mixed_precision", "fp16"], "needs a GPU"),
    (lambda t: ["--config_overrides", "nokey"], "is not key=value"),
    (lambda t: ["--lr_find_steps", "100", "--max_train_steps", "40"], "must be below the budget"),
    (lambda t: ["--deepspeed_config", write(t, "ds.json", "{not json")], "--deepspeed_config"),
    (lambda t: ["--deepspeed_config", write(t, "ds.json", '{"optimizer": {"type": "AdamW"}}')], "defines 'optimizer'"),
    (lambda t: ["--deepspeed_config", write(t, "ds.json", '{"train_micro_batch_size_per_gpu": 4}')], 'must be "auto"'),
    (lambda t: ["--deepspeed_config", write(t, "ds.json", '{"zero_optimization": {"stage": 7}}')], "stage"),
    (lambda t: ["--deepspeed_config", write(t, "ds.json", '{"zero_optimization": {"stage": true}}')], "got true"),
    (lambda t: ["--deepspeed_config", write(t, "ds.json", '{"zero_optimization": {"stages": 2}}')], "stages Extra"),
    (
        lambda t: [
            "--deepspeed_config",
            write(t, "ds.json", '{"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}'),
        ],
        "without a nvme_path",
    ),
    (lambda t: ["--deepspeed_config", write(t, "ds.json", '{"zero_optimization": 2}')], "must be an object"),
    (lambda t: ["--deepspeed_config", str(t / "nope.json")], "--deepspeed_config"),
    (
        lambda t: ["--mixed_precision", "no", "--deepspeed_config", write(t, "ds.json", '{"bf16": {"enabled": true}}')],
        "'bf16.enabled' is true while --mixed_precision is no",
    ),
    (
        lambda t: [
            "--deepspeed_config",
            write(t, "ds.json", json.dumps({"zero_optimization": {"stage": 3, GATHER: False}})),
        ],
        "must be true",
    ),
    (lambda t: ["--optimizer", "schedulefree"], "--zero_stage 0"),
    (lambda t: ["--resume_from_checkpoint", str(t / "step_9")], "--resume_from_checkpoint"),
    (lambda t: ["--resume_from_checkpoint", "latest"], "no complete step_N"),
    (lambda t: ["--model_name_or_path", str(t)], "not a model directory"),
    (lambda t: ["--model_name_or_path", str(t / "no-such-model")], "does not exist"),
    (lambda t: ["--model_type", "llama", "--config_name", "gpt2"], "--model_type builds a model from scratch"),
    (lambda t: ["--output_dir", write(t, "a-file", "x")], "is a file"),
    (lambda t: ["--output_dir", "/proc/no/such/dir"], "not writable"),
    (lambda t: ["--output_dir", ""], "--output_dir '' names no directory"),
]


@pytest.mark.parametrize("make_args,expected", BAD, ids=[e for _, e in BAD])
def test_bad_input_is_refused_in_one_line_before_any_work(tmp_path, previous_run, make_args, expected):
    before = snapshot(previous_run)
    with pytest.raises(SystemExit) as e:
        train.main(["--output_dir", str(previous_run), "--overwrite_output_dir", *make_args(tmp_path)])
    msg = str(e.value.code)
    assert msg.startswith("train.py: error:") and "\n" not in msg and expected in msg, msg
    assert snapshot(previous_run) == before


def test_the_launchers_deepspeed_config_file_is_used(tmp_path):
    """An accelerate config's `deepspeed_config_file` was ignored (train.py read ds_config.json beside it): a ZeRO-3
    JSON named there ran ZeRO-2. It is the default now (train.py's --deepspeed_config still wins); one that is not
    there is named in one line. The JSON says only {"stage": 3}: without stage3_gather_16bit_weights_on_model_save
    DeepSpeed refused the final save after the whole run (train.py now sets it)."""
    with open(os.path.join(ROOT, "ds_config.json")) as f:
        ds = json.load(f) | {"zero_optimization": {"stage": 3}}
    (tmp_path / "zero3.json").write_text(json.dumps(ds))
    with open(os.path.join(ROOT, "accelerate_config.yaml")) as f:
        config = f.read().replace("file: ds_config.json", f"file: {tmp_path}/zero3.json")
    assert str(tmp_path) in config
    (tmp_path / "acc.yaml").write_text(config)
    out = str(tmp_path / "out")
    flags = [*TINY, "--max_train_steps", "4", "--sample_tokens", "0", "--output_dir", out]
    launch(flags, config=str(tmp_path / "acc.yaml"))
    assert results(out)["zero_stage"] == 3
    # the config `accelerate config` writes: DeepSpeed's settings inline, no file (Accelerate raised after the build)
    inline = config.replace(f"deepspeed_config_file: {tmp_path}/zero3.json", "zero_stage: 3")
    (tmp_path / "inline.yaml").write_text(inline)
    p = launch(flags + ["--overwrite_output_dir"], config=str(tmp_path / "inline.yaml"), check=False)
    said = error_lines(p)
    assert p.returncode != 0 and len(said) == 1 and "zero_stage" in said[0] and "deepspeed_config_file" in said[0]
    (tmp_path / "acc.yaml").write_text(config.replace("zero3.json", "nosuch.json"))
    p = launch(flags + ["--overwrite_output_dir"], config=str(tmp_path / "acc.yaml"), check=False)
    said = error_lines(p)
    assert p.returncode != 0 and len(said) == 1 and "deepspeed_config_file" in said[0] and "nosuch.json" in said[0]


@pytest.mark.parametrize(
    "stage,config",
    [(0, "{}"), (3, '{"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": "auto"}}')],
)
def test_a_deepspeed_json_that_leaves_things_out_runs_to_the_saved_model(tmp_path, stage, config):
    """Both ran, then raised in Accelerate's final save, after the whole run, and the model was lost: a JSON without a
    stage (DeepSpeed's default: 0) with KeyError: 'stage'; one whose ZeRO-3 gather flag was "auto" (Accelerate made it
    false) with "Cannot get 16bit model weights"."""
    out = str(tmp_path / "out")
    ds = write(tmp_path, "ds.json", config)
    launch([*TINY, "--max_train_steps", "4", "--sample_tokens", "0", "--output_dir", out, "--deepspeed_config", ds])
    assert results(out)["zero_stage"] == stage
    assert_finite_model(out)


def test_the_launchers_cpu_flag_is_refused_in_one_line(tmp_path):
    """`accelerate launch --cpu train.py` turns DeepSpeed off: it crashed in the loop (an AttributeError on
    DistributedDataParallel); now one line before any work."""
    out = str(tmp_path / "out")
    p = launch([*TINY, "--output_dir", out], check=False, launcher=["--cpu"])
    said = error_lines(p)
    assert p.returncode != 0 and len(said) == 1 and "accelerate launch --cpu" in said[0], p.stderr[-2000:]
    assert not os.path.exists(out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CPU: where bf16 is refused")
def test_the_launchers_mixed_precision_counts(tmp_path):
    """`accelerate launch --mixed_precision bf16 train.py` ran in fp32 without a word: train.py passed its own
    default to the Accelerator, over the launcher's. Without train.py's flag the launcher's precision now counts (on
    CPU: refused in one line, naming where it can come from); train.py's own flag still wins."""
    out = str(tmp_path / "out")
    flags = [*TINY, "--max_train_steps", "4", "--sample_tokens", "0", "--output_dir", out]
    p = launch(flags, check=False, launcher=["--mixed_precision", "bf16"])
    said = error_lines(p)
    assert p.returncode != 0 and len(said) == 1 and "--mixed_precision bf16 needs a GPU" in said[0], p.stderr[-2000:]
    assert "accelerate launch" in said[0]
    assert not os.path.exists(out)
    launch([*flags, "--mixed_precision", "no"], launcher=["--mixed_precision", "bf16"])
    assert results(out)["steps"] == 4


def test_the_launchers_fp8_is_refused_in_one_line(tmp_path, monkeypatch):
    """`accelerate launch --mixed_precision fp8` (what the launcher sets: ACCELERATE_MIXED_PRECISION) ran in bf16 on a
    GPU, fp32 on CPU, without a word: refused in one line before any work; train.py's own flag still wins."""
    out = str(tmp_path / "out")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(SystemExit) as e:
        train.main([*TINY, "--output_dir", out])
    assert "--mixed_precision fp8" in str(e.value.code) and "no, fp16 or bf16" in str(e.value.code), e.value.code
    assert not os.path.exists(out)
    assert train.parse_args([*TINY, "--mixed_precision", "no"]).mixed_precision == "no"


def test_the_launchers_deepspeed_flags_are_refused_in_one_line(tmp_path, monkeypatch):
    """`accelerate launch --use_deepspeed --zero_stage 3 train.py` (or --gradient_clipping, --offload_*_device, ...
    given to the launcher) ran ZeRO-2 from ds_config.json without a word: refused in one line before any work, naming
    train.py's own flag or the JSON's field."""
    out = str(tmp_path / "out")
    p = launch([*TINY, "--output_dir", out], check=False, launcher=["--use_deepspeed", "--zero_stage", "3"])
    said = error_lines(p)
    assert p.returncode != 0 and len(said) == 1 and "pass train.py --zero_stage 3" in said[0], p.stderr[-2000:]
    assert not os.path.exists(out)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu")  # what --offload_optimizer_device sets
    with pytest.raises(SystemExit) as e:
        train.main([*TINY, "--output_dir", out])
    assert '"offload_optimizer": {"device": "cpu"}' in str(e.value.code), e.value.code


def test_previous_run_or_model_is_not_overwritten_without_the_flag(previous_run, tmp_path):
    before = snapshot(previous_run)
    with pytest.raises(SystemExit) as e:
        train.main(["--output_dir", str(previous_run)])
    assert "--overwrite_output_dir" in str(e.value.code) and snapshot(previous_run) == before
    model = tmp_path / "model"  # fine-tuning into the model's own directory would overwrite it
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(SystemExit) as e:
        train.main(["--model_name_or_path", str(model), "--output_dir", str(model)])
    assert "--overwrite_output_dir" in str(e.value.code) and (model / "model.safetensors").read_bytes() == b"weights"


def jsonl(rows_):
    return "\n".join(json.dumps(r) for r in rows_)


# found only once the data, tokenizer or model are loaded: each a real train.py process, with a previous run in
# --output_dir and --overwrite_output_dir, which must survive the error untouched
LATE = [
    (
        "blank lines only",
        lambda t: ["--train_file", write(t, "blank.txt", "\n \n\n  \n" * 50)],
        "the train data holds no text: every 'text' is blank",
    ),
    (
        "no text column",
        lambda t: ["--train_file", write(t, "c.jsonl", jsonl({"body": f"x {i}"} for i in range(300)))],
        "--text_column 'text' is not a column of the train data (it has body)",
    ),
    (
        "numbers for text",
        lambda t: ["--train_file", write(t, "n.csv", "text\n" + "\n".join(map(str, range(300))))],
        "holds int64, not text",
    ),
    (
        "named column missing",
        lambda t: [
            "--train_file",
            write(t, "t.jsonl", jsonl({"text": "to be"} for _ in range(300))),
            "--text_column",
            "content",
        ],
        "--text_column 'content' is not a column",
    ),
    (
        "one JSON object holding the texts",  # (it said "1 texts: too few to hold out")
        lambda t: ["--train_file", write(t, "one.json", '{"data": [{"text": "a"}, {"text": "b"}]}')],
        "--text_column 'text' is not a column of the train data (it has data)",
    ),
    (
        "a few blank lines",  # (it said "the training data has 3 texts: too few to hold out")
        lambda t: ["--train_file", write(t, "few-blank.txt", "\n \n\n")],
        "the train data holds no text: every 'text' is blank",
    ),
    (
        "a validation file of blank lines",  # (grouping raised: a split of blank texts has no ids column)
        lambda t: [
            "--train_file",
            write(t, "t.txt", "to be or not\n" * 300),
            "--validation_file",
            write(t, "v.txt", "\n \n\n"),
        ],
        "the validation data holds no text: every 'text' is blank",
    ),
    (
        "too few texts to split",
        lambda t: ["--train_file", write(t, "few.jsonl", jsonl([{"text": "x" * 5000}] * 3))],
        "too few to hold out",
    ),
    ("override of the wrong type", lambda t: ["--config_overrides", "n_layer=abc"], "--config_overrides"),
    ("empty model config", lambda t: ["--model_name_or_path", empty_model(t)], "no causal LM could be built"),
    ("a model type that is not a causal LM", lambda t: ["--model_type", "nosuchtype"], "is not a causal LM type"),
    (
        "overrides the config refuses",  # (its per-layer list has its own length): before training, not at the save
        lambda t: ["--model_type", "zamba2", "--config_overrides", "num_hidden_layers=2"],
        "no causal LM could be built (StrictDataclassClassValidationError: ValueError: `num_hidden_layers` (2)",
    ),
    (
        "an override the model's constructor refuses",  # (an assertion in its embedding: one line, naming the flag)
        lambda t: ["--model_type", "phi3", "--config_overrides", "num_hidden_layers=1,pad_token_id=1000"],
        "--config_overrides: no causal LM could be built (AssertionError: Padding_idx must be within num_embeddings)",
    ),
    (
        "an override the config's constructor refuses",
        lambda t: ["--model_type", "prophetnet", "--config_overrides", "num_hidden_layers=2"],
        "no causal LM could be built (NotImplementedError: This model does not support the setting of `num_hidden_",
    ),
    (
        "a config that builds but cannot run",  # (a rotary width past its heads 16 wide): before any file goes
        lambda t: ["--model_type", "gptj", "--config_overrides", "n_embd=64,n_layer=1,n_head=4,rotary_dim=64"],
        "--config_overrides: the model fails on a block of --block_size 32 (RuntimeError: The size of tensor a (16)",
    ),
    (
        "a block longer than MPT's positions",  # (MPT names them max_seq_len)
        lambda t: ["--model_type", "mpt", "--config_overrides", "d_model=64,n_layers=1,n_heads=4,max_seq_len=16"],
        "--block_size 32 is longer than the model's 16 positions",
    ),
    (
        "a model's own code without --trust_remote_code",  # refused, not prompted for (None would prompt on every rank)
        lambda t: ["--model_name_or_path", custom_code_model(t / "custom")],
        "ships its own Python code: add --trust_remote_code",
    ),
    (
        "--gradient_checkpointing on a model without it",
        lambda t: [
            "--model_name_or_path",
            custom_code_model(t / "custom", checkpointing=False),
            "--trust_remote_code",
            "--gradient_checkpointing",
        ],
        "--gradient_checkpointing: TinyCustomForCausalLM does not support it",
    ),
]


def empty_model(tmp_path):
    d = tmp_path / "empty-model"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text("{}")
    from transformers import ByT5Tokenizer

    ByT5Tokenizer().save_pretrained(d)
    return str(d)


def one_line_failure(p, expected):
    last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
    assert p.returncode != 0 and last.startswith("train.py: error:") and expected in last, p.stderr[-2000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]


@pytest.mark.parametrize("name,make_args,expected", LATE, ids=[n for n, _, _ in LATE])
def test_bad_data_or_model_is_refused_in_one_line_and_the_previous_run_survives(
    tmp_path, previous_run, name, make_args, expected
):
    before = snapshot(previous_run)
    cmd = [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        *TINY,
        "--output_dir",
        str(previous_run),
        "--overwrite_output_dir",
        *make_args(tmp_path),
    ]
    one_line_failure(subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False), expected)
    assert snapshot(previous_run) == before


def test_a_machine_without_git_or_a_compiler_runs_and_gets_its_results(tmp_path):
    """Slim containers and laptops without build tools. DeepSpeed's CPU backend compiled a C++ op at start (used by
    its inference only): a traceback without a compiler. evaluate.save asks the git program for the commit: without
    git the run raised after training, before results.json, the plot and the sample. Every program on PATH but those,
    and no compiled op cached."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    missing = re.compile(r"git|c\+\+|g\+\+|gcc.*|cc|clang.*|ninja|.*-linux-gnu-.*")
    for d in os.environ["PATH"].split(os.pathsep) + [os.path.dirname(sys.executable)]:
        for name in os.listdir(d) if os.path.isdir(d) else []:
            if not missing.fullmatch(name) and not (bin_dir / name).exists():
                (bin_dir / name).symlink_to(os.path.join(d, name))
    out = str(tmp_path / "out")
    env = dict(os.environ, PATH=str(bin_dir), TORCH_EXTENSIONS_DIR=str(tmp_path / "ops"))
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *TINY, "--max_train_steps", "4", "--output_dir", out]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0 and "----- sample -----" in p.stdout, p.stderr[-2000:]
    res = results(out)
    assert res["steps"] == 4 and res["_git_commit_hash"] is None and res["_python_version"] == sys.version


def test_block_size_larger_than_the_data(tmp_path):
    f = write(tmp_path, "tiny.txt", "To be, or not to be.\n" * 40)  # 2 lines held out: 44 tokens
    p = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), "--train_file", f, "--output_dir", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        check=False,
    )
    one_line_failure(p, "the validation data holds fewer than --block_size=128 tokens")


# ---------------------------------------------------------------- checkpoints: incompatible, damaged
SEARCHING = ["--search_budget", "0.5", "--learning_rate", "1.0"]  # far too high: the down trial holds slots


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A tiny rl run with a checkpoint every 4 steps (the rl search holds slots in some of them)."""
    out = str(tmp_path_factory.mktemp("ck") / "run")
    launch(TINY + SEARCHING + ["--output_dir", out, "--checkpointing_steps", "4"])
    return out


def test_incompatible_resume_is_refused(checkpointed, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(os.path.join(checkpointed, "step_8"), os.path.join(out, "step_8"))
    base = TINY + SEARCHING + ["--output_dir", out, "--resume_from_checkpoint", "latest"]
    for extra, expected in [
        (["--learning_rate", "1e-2"], "learning_rate was 1.0, now 0.01"),
        (["--zero_stage", "3"], "zero_stage was 2, now 3"),
        (["--block_size", "64"], "block_size was 32, now 64"),
        (["--validation_split_percentage", "20"], "validation_split_percentage was 5, now 20"),  # the train split
        (["--max_eval_batches", "4"], "max_eval_batches was 2, now 4"),  # the eval loss the controller reads
        (["--controller_trial_steps", "5"], "controller_trial_steps was 4, now 5"),
    ]:
        with pytest.raises(SystemExit) as e:
            train.main(base + extra)
        assert "incompatible run" in str(e.value.code) and expected in str(e.value.code), e.value.code
    # a checkpoint from before --controller_trial_steps: its search ran in segments of its interval
    state = os.path.join(out, "step_8", "train_state.json")
    with open(state) as f:
        saved = json.load(f)
    del saved["train"]["signature"]["controller_trial_steps"]
    with open(state, "w") as f:
        json.dump(saved, f)
    with pytest.raises(SystemExit) as e:
        train.main(base + ["--controller_trial_steps", "5"])
    assert "controller_trial_steps was 4, now 5" in str(e.value.code)  # (the interval's 4, not None)


def test_a_resume_on_other_data_is_refused_in_one_line(tmp_path):
    """A training file grown since the checkpoint: the data position means nothing there (the resumed run went on
    without a word). Refused before anything on disk changes."""
    text = "to be or not to be, that is the question\n" * 300
    data = write(tmp_path, "t.txt", text)
    out = str(tmp_path / "out")
    launch(TINY + ["--train_file", data, "--output_dir", out, "--checkpointing_steps", "8"])
    write(tmp_path, "t.txt", text + "whether 'tis nobler in the mind to suffer\n" * 100)
    before = snapshot(out)
    resume = TINY + ["--train_file", data, "--output_dir", out, "--resume_from_checkpoint", "latest"]
    one_line_failure(launch(resume, check=False), "was saved on other data: train ")
    assert snapshot(out) == before


DAMAGE = {
    "emptied train_state.json": ("train_state.json", lambda p: open(p, "w").close(), "not a valid train_state.json"),
    "deleted model file": ("pytorch_model/mp_rank_00_model_states.pt", os.remove, "missing"),
    "truncated optimizer file": (
        "pytorch_model/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        lambda p: os.truncate(p, os.path.getsize(p) // 2),
        "bytes, written with",
    ),
    "deleted rng state": ("random_states_0.pkl", os.remove, "missing"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_checkpoint_is_named_in_one_line(checkpointed, tmp_path, case):
    rel, damage, expected = DAMAGE[case]
    out = tmp_path / "out"
    shutil.copytree(os.path.join(checkpointed, "step_8"), out / "step_8")
    damage(str(out / "step_8" / rel))
    before = snapshot(out)
    with pytest.raises(SystemExit) as e:
        train.main(TINY + SEARCHING + ["--output_dir", str(out), "--resume_from_checkpoint", "latest"])
    assert expected in str(e.value.code) and "\n" not in str(e.value.code), e.value.code
    assert (
        rel.split("/")[-1] in str(e.value.code) or case == "emptied train_state.json" or expected in str(e.value.code)
    )
    assert snapshot(out) == before


def test_damaged_rollback_slot_is_named_when_resuming(checkpointed, tmp_path):
    """A checkpoint taken during the rl search holds slots; a truncated slot file is found at the resume, not at
    the first rollback."""
    with_slots = [
        n
        for n in sorted(os.listdir(checkpointed))
        if n.startswith("step_")
        and os.path.isdir(os.path.join(checkpointed, n, "controller_slots"))
        and any(files for _, _, files in os.walk(os.path.join(checkpointed, n, "controller_slots")))
    ]
    assert with_slots, os.listdir(checkpointed)
    out = tmp_path / "out"
    shutil.copytree(os.path.join(checkpointed, with_slots[0]), out / with_slots[0])
    slot_file = next(os.path.join(d, f) for d, _, fs in os.walk(out / with_slots[0] / "controller_slots") for f in fs)
    os.truncate(slot_file, 10)
    with pytest.raises(SystemExit) as e:
        train.main(TINY + SEARCHING + ["--output_dir", str(out), "--resume_from_checkpoint", "latest"])
    assert "controller_slots" in str(e.value.code) and "damaged" in str(e.value.code), e.value.code


def test_resume_with_slots_kept_another_way_is_one_line(checkpointed, tmp_path):
    """Slots checkpointed as in-memory copies cannot be loaded as DeepSpeed checkpoints on disk (and the reverse):
    a resume with --controller_slots changed says so at once, naming the flag and the setting that works, instead of
    failing at the next rollback (a DeepSpeed assertion, after steps already spent)."""
    name = next(
        n for n in sorted(os.listdir(checkpointed)) if os.path.isdir(os.path.join(checkpointed, n, "controller_slots"))
    )
    out = tmp_path / "out"
    shutil.copytree(os.path.join(checkpointed, name), out / name)
    before = snapshot(out)
    with pytest.raises(SystemExit) as e:
        train.main(
            TINY
            + SEARCHING
            + ["--output_dir", str(out), "--resume_from_checkpoint", "latest", "--controller_slots", "disk"]
        )
    msg = str(e.value.code)
    assert "--controller_slots disk" in msg and "--controller_slots memory" in msg and "\n" not in msg, msg
    assert snapshot(out) == before


# ---------------------------------------------------------------- the lr range test and its state
def test_lr_range_test_then_rl_starts_from_the_suggestion_and_a_resume_keeps_it(tmp_path):
    """--lr_find_steps with --controller rl: the range test runs first (its tokens discarded), the controller starts
    from the suggested lr with bounds around it, and a resume continues at the suggested lr, not the flag's."""
    common = TINY + ["--lr_find_steps", "6", "--controller", "rl", "--max_train_steps", "24"]
    full = str(tmp_path / "full")
    p = launch(common + ["--output_dir", full, "--checkpointing_steps", "12"])
    line = next(x for x in p.stdout.splitlines() if x.startswith("[lr_find]"))
    suggested = float(line.split()[-1])
    res = results(full)
    assert res["learning_rate"] == pytest.approx(suggested, rel=1e-3) and res["tokens_discarded"] >= 6 * 4 * 32
    first = rows(full)[0]
    assert first["lr"] <= suggested * 1.0001  # the schedule x the controller's multiplier, around the suggestion
    resumed = str(tmp_path / "resumed")
    launch(common + ["--output_dir", resumed, "--resume_from_checkpoint", os.path.join(full, "step_12")])
    assert results(resumed)["learning_rate"] == res["learning_rate"]
    assert results(resumed)["eval_loss"] == pytest.approx(res["eval_loss"], rel=1e-6)


# ---------------------------------------------------------------- non-finite losses never reach the weights
def fault_launch(tmp_path, env, extra, processes=1, check=True, script="tests/faulty_run.py"):
    out = str(tmp_path / "run")
    config = "accelerate_config.yaml" if processes > 1 else None
    cmd = launch_cmd(script, processes, config) + [*TINY, "--output_dir", out, *extra]
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


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_nan_at_the_last_step_never_reaches_the_weights(tmp_path, stage):
    """16 steps of one micro-batch each: forward call 16 is the last step's. ZeRO 1-2 skip it in DeepSpeed's
    overflow check, stage 0 in SkipNonFinite; the saved model and the final evaluation are finite."""
    out, p = fault_launch(tmp_path, {"FAULT_CALLS": "16"}, ["--controller", "off", "--zero_stage", str(stage)])
    res = results(out)
    assert res["nonfinite_steps"] == 1 and res["eval_loss"] < 5.9, p.stdout[-2000:]
    assert_finite_model(out)


def test_one_nan_is_one_skipped_step_at_zero_stage_0(tmp_path):
    """Before the fix, a NaN at step 6 reached the weights at stage 0 and steps 7 and 8 were non-finite too."""
    out, p = fault_launch(tmp_path, {"FAULT_CALLS": "6"}, ["--controller", "off", "--zero_stage", "0"])
    assert p.stdout.count("update skipped") == 1 and results(out)["nonfinite_steps"] == 1
    assert_finite_model(out)


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_isolated_nonfinite_steps_are_skipped(tmp_path, kind):
    """Steps 6, 7 (one segment: a fault) and 11 (alone in its segment: a bad record, not a fault), not in a row."""
    out, p = fault_launch(tmp_path, {"FAULT_CALLS": "6,7,11", "FAULT_KIND": kind}, ["--controller", "plateau"])
    assert p.stdout.count("update skipped") == 3
    res = results(out)
    assert res["nonfinite_steps"] == 3 and res["eval_loss"] < 5.9  # below ln(384) = 5.95 at init: still learning
    assert_finite_model(out)
    # the controller saw it: two skipped steps earned the strong negative reward and halved the lr, one did not
    decided = {r["step"]: r for r in rows(out) if "controller/action" in r}
    assert decided[8]["controller/reward"] == -1.0 and decided[8]["controller/lr_scale"] == 0.5, decided[8]
    assert decided[12]["controller/reward"] != -1.0 and decided[12]["controller/lr_scale"] == 0.5, decided[12]


def test_consecutive_nonfinite_steps_lower_the_lr_at_once(tmp_path):
    out, p = fault_launch(tmp_path, {"FAULT_CALLS": "9,10,11"}, ["--controller", "plateau"])
    events = [r for r in rows(out) if r.get("event") == "nonfinite_rollback"]
    assert len(events) == 1, p.stdout[-2000:]
    assert events[0]["controller/action"] == "rollback" and events[0]["controller/lr_scale"] == 0.5
    assert results(out)["nonfinite_steps"] == 3
    assert_finite_model(out)


def test_consecutive_nonfinite_steps_without_controller_stop_cleanly(tmp_path):
    _, p = fault_launch(tmp_path, {"FAULT_CALLS": "5,6,7"}, ["--controller", "off"], check=False)
    assert p.returncode != 0
    assert "3 consecutive non-finite steps at step 7" in p.stderr


def test_a_fault_that_persists_at_the_lowest_lr_stops_cleanly(tmp_path):
    """Every forward from call 5 on is NaN: the controller halves the lr at each 3 in a row, down to --min_lr (here a
    quarter of the lr: two halvings); 3 more at that floor stop the run with one line, weights intact, instead of
    skipping every step to the end."""
    bad = ",".join(str(i) for i in range(5, 40))
    _, p = fault_launch(tmp_path, {"FAULT_CALLS": bad}, ["--controller", "plateau", "--min_lr", "7.5e-4"], check=False)
    assert p.returncode != 0 and p.stdout.count("update skipped") == 9, p.stdout[-2000:]
    assert "3 consecutive non-finite steps at step 13 at the lowest lr the controller may set (0.00075" in p.stderr


@pytest.mark.parametrize("slots", ["memory", "disk"])
def test_weights_that_come_back_damaged_are_rolled_back_to_the_same_slot_twice(tmp_path, slots):
    """From a too-low lr the climb moves up at step 4 (slot best: the weights from before the move); the evaluations
    at steps 8 and 12 (eval forward calls 5-8: the initial evaluation is calls 1-2) read NaN, as diverged weights
    would: two rollbacks to the same slot at a halved lr each (the first keeps it, the second frees it), then the run
    goes on from it, finite to the end."""
    flags = ["--controller", "rl", "--learning_rate", "1e-4", "--max_train_steps", "32", "--controller_slots", slots]
    out, p = fault_launch(tmp_path, {"FAULT_EVAL_CALLS": "5,6,7,8"}, flags)
    decided = {r["step"]: r for r in rows(out) if "controller/action" in r}
    assert [decided[s]["controller/action"] for s in (4, 8, 12)] == ["up_x1.78", "rollback", "rollback"], decided
    safety = "safety: rollback reward -1.0000 lr_scale"
    assert f"step 8 tokens 1024 {safety} 0.889 grad_accum 1 load best\n" in p.stdout, p.stdout[-3000:]
    assert f"step 12 tokens 1536 {safety} 0.445 grad_accum 1 load best drop best" in p.stdout
    assert decided[16]["controller/action"] == "commit" and math.isfinite(decided[16]["eval_loss"])
    res = results(out)
    assert res["rollbacks"] == 2 and res["tokens_discarded"] == 2 * 4 * 4 * 32 and math.isfinite(res["eval_loss"])
    assert_finite_model(out)


@pytest.mark.parametrize("controller", ["off", "rl"])
def test_fp16_loss_scale_overflows_are_not_faults(tmp_path, controller):
    """DeepSpeed's fp16 path run for real on the CPU (tests/fp16_cpu_run.py), its dynamic loss scale started at 2^24
    so that the first steps overflow: DeepSpeed skips them and lowers the scale, which is routine; train.py counts none
    as a non-finite step: `off` does not stop, `rl` does not roll back. (Both fail on the train.py before the fix:
    there `off` stopped at step 3, "3 consecutive non-finite steps".) Nor does a skipped step count as one of a
    segment's updates: rl's first decision comes after 4 updates (its segment), not 4 steps (on a GPU a loss spike
    that overflowed 5 steps in a row had put the default run's first reading on the spike's weights: it went up 3x and
    ended 16% above `off`)."""
    with open(os.path.join(ROOT, "ds_config.json")) as f:
        ds = json.load(f)
    ds["fp16"] = {"enabled": "auto", "initial_scale_power": 24}
    config = tmp_path / "ds_fp16.json"
    config.write_text(json.dumps(ds))
    flags = ["--mixed_precision", "fp16", "--deepspeed_config", str(config), "--controller", controller]
    out, p = fault_launch(tmp_path, {}, flags, script="tests/fp16_cpu_run.py")
    skipped = [int(line.split()[-1]) for line in p.stdout.splitlines() if line.startswith("[fp16] skipped_steps")]
    res = results(out)
    assert skipped[-1] >= 3 and res["nonfinite_steps"] == 0 and res["rollbacks"] == 0, (skipped, res)
    assert res["loss_scale_skips"] == skipped[-1], (skipped, res)
    if controller == "rl":
        first = next(r["step"] for r in rows(out) if r.get("controller/action"))
        assert skipped[first - 1] >= 3 and first - skipped[first - 1] == 4, (first, skipped)
    assert_finite_model(out)


@pytest.mark.parametrize("stage", [0, 2])
def test_fault_on_one_rank_only_is_handled_on_both(tmp_path, stage):
    out, p = fault_launch(
        tmp_path,
        {"FAULT_CALLS": "6", "FAULT_RANK": "1"},
        ["--controller", "rl", "--zero_stage", str(stage)],
        processes=2,
    )
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
        "--search_budget",
        "0.5",
    ]
    ref = str(tmp_path / "ref")
    launch(common + ["--output_dir", ref])
    assert len([n for n in os.listdir(ref) if n.startswith("step_")]) == 2  # --save_total_limit 2

    out = str(tmp_path / "killed")
    # kill 1: while step_8 is being written (its .tmp exists); kill 2: right after step_16 is complete
    for wait_for in ("step_8.tmp", "step_16"):
        cmd = launch_cmd("train.py", launcher=True) + [*common, "--output_dir", out, "--overwrite_output_dir"]
        if os.path.isdir(os.path.join(out, "step_4")) or os.path.isdir(os.path.join(out, "step_8")):
            cmd[cmd.index("--overwrite_output_dir")] = "--resume_from_checkpoint=latest"
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.time() + 300
        marks = [os.path.join(out, wait_for), os.path.join(out, wait_for.removesuffix(".tmp"))]  # a too quick save
        while not any(os.path.exists(m) for m in marks) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not os.path.exists(os.path.join(out, "results.json")), "the run finished before the kill"
    # a half-written checkpoint is never taken for a complete one
    os.makedirs(os.path.join(out, "step_99.tmp"), exist_ok=True)
    os.makedirs(os.path.join(out, "step_98"), exist_ok=True)  # no train_state.json: incomplete
    p = launch(common + ["--output_dir", out, "--resume_from_checkpoint", "latest"])
    resumed_from = int(next(x for x in p.stdout.splitlines() if "Resuming from" in x).rsplit("step_", 1)[1])
    assert resumed_from >= 16
    assert results(out)["eval_loss"] == pytest.approx(results(ref)["eval_loss"], rel=1e-6)
    # each step's rows once, as in the uninterrupted run (the killed runs' rows after their checkpoints are dropped)
    assert [(r["step"], r.get("controller/action")) for r in rows(out)] == [
        (r["step"], r.get("controller/action")) for r in rows(ref)
    ]
    for r, q in zip(rows(out), rows(ref)):
        assert r.get("eval_loss", 0) == pytest.approx(q.get("eval_loss", 0), rel=1e-6)


def test_a_resume_logs_each_step_once(tmp_path):
    """After a resume, metrics.jsonl and TensorBoard hold each step once: the interrupted run's rows after the
    checkpoint (here a finished run resumed from step_8) and a line a kill cut short are dropped, TensorBoard's events
    after the checkpoint purged. They came twice, and the torn line broke run.png at the end. The run's later
    checkpoints are an abandoned continuation ('latest' took them, its rows gone): refused in one line without
    --overwrite_output_dir, deleted with it (they stayed until written over: one past the run's end stayed for good)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = str(tmp_path / "run")
    common = TINY + ["--with_tracking", "--checkpointing_steps", "4", "--sample_tokens", "0", "--output_dir", out]
    launch(common)
    ref = [(r["step"], r.get("eval_loss")) for r in rows(out)]
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 16, "tokens_se')  # a kill while a row was written
    shutil.copytree(os.path.join(out, "step_12"), os.path.join(out, "step_20"))  # as a longer run would leave
    resume = common + ["--resume_from_checkpoint", os.path.join(out, "step_8")]
    before = snapshot(out)
    with pytest.raises(SystemExit) as e:
        train.main(resume)
    assert "(step_12, step_20;" in str(e.value.code) and "--overwrite_output_dir" in str(e.value.code)
    assert snapshot(out) == before
    launch(resume + ["--overwrite_output_dir"])
    assert sorted(n for n in os.listdir(out) if n.startswith("step_")) == ["step_12", "step_4", "step_8"]
    now = [(r["step"], r.get("eval_loss")) for r in rows(out)]
    assert [s for s, _ in now] == [s for s, _ in ref] and [x for _, x in now] == pytest.approx([x for _, x in ref])
    logged = EventAccumulator(os.path.join(out, "train")).Reload().Scalars("eval/loss")
    assert [(e.step, e.value) for e in logged] == [(s, pytest.approx(x)) for s, x in now if x is not None]


def test_a_resume_from_another_directory_starts_a_new_runs_logs(checkpointed, tmp_path):
    """A checkpoint from elsewhere resumed into a directory that holds another run: refused without
    --overwrite_output_dir (it passed, as a resume, and that run's rows were trimmed and appended to, and its later
    step_N stayed, the next `--resume_from_checkpoint latest`); with the flag, that run goes as before a fresh run."""
    other = tmp_path / "other"
    shutil.copytree(checkpointed, other)  # a previous run: its logs, results and step_4 .. step_N
    ckpt = os.path.join(checkpointed, "step_8")
    base = TINY + SEARCHING + ["--output_dir", str(other), "--resume_from_checkpoint", ckpt, "--sample_tokens", "0"]
    before = snapshot(other)
    with pytest.raises(SystemExit) as e:
        train.main(base)
    assert "--overwrite_output_dir" in str(e.value.code) and "not one of its step_N" in str(e.value.code), e.value.code
    assert snapshot(other) == before
    launch(base + ["--overwrite_output_dir"])
    assert not [n for n in os.listdir(other) if n.startswith("step_")]
    steps = [r["step"] for r in rows(other)]
    assert steps and min(steps) > 8 and steps == sorted(steps), steps
    assert os.path.isfile(os.path.join(checkpointed, "step_8", "train_state.json"))  # the source is left as it was


def test_a_full_disk_is_one_line_and_the_last_checkpoint_resumes(tmp_path):
    """--output_dir on a file system that fills up (a tmpfs in a mount namespace of its own, 1.2x one checkpoint):
    a checkpoint's save failed with torch's "unexpected pos" traceback and left its step_N.tmp holding the space. Now
    one line names the checkpoint, the space left and the checkpoint kept; the partial files are gone; given more
    space, the resume reaches the uninterrupted result. The final model's save on a full disk: one line too."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True, check=False).returncode:
        pytest.skip("no mount namespace here (unshare -m needs root or user namespaces)")
    flags = TINY + ["--sample_tokens", "0", "--checkpointing_steps", "2", "--save_total_limit", "1"]
    ref = str(tmp_path / "ref")
    launch(flags + ["--output_dir", ref, "--save_total_limit", "16"])  # every checkpoint kept: the largest's size
    largest = max(
        sum(os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(os.path.join(ref, n)) for f in names)
        for n in os.listdir(ref)
        if n.startswith("step_")
    )
    disk, small, logs = tmp_path / "disk", tmp_path / "small", tmp_path / "logs"
    for d in (disk, small, logs):
        d.mkdir()
    run = [sys.executable, os.path.join(ROOT, "train.py"), *flags]
    final = [sys.executable, os.path.join(ROOT, "train.py"), *TINY, "--sample_tokens", "0"]  # no checkpoints
    script = f"""
        mount -t tmpfs -o size={int(1.2 * largest) // 1024}k tmpfs {disk} && mount -t tmpfs -o size=100k tmpfs {small}
        {" ".join(run)} --output_dir {disk}/run > /dev/null 2> {logs}/full.err; echo $? > {logs}/full.rc
        find {disk}/run > {logs}/full.ls
        for d in {disk}/run/step_*; do test -f $d/train_state.json && echo $d; done > {logs}/kept
        mount -o remount,size=64m {disk}
        {" ".join(run)} --output_dir {disk}/run --resume_from_checkpoint latest > /dev/null 2> {logs}/resume.err
        cp {disk}/run/results.json {logs}/
        {" ".join(final)} --output_dir {small}/run > /dev/null 2> {logs}/final.err
    """
    subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script], cwd=ROOT, timeout=600, check=False
    )

    def error_line(name):  # (it may follow the progress bar on its line)
        said = (logs / name).read_text()
        assert "Traceback" not in said, said
        found = re.findall(r"train\.py: error: [^\r\n]*", said)
        assert len(found) == 1, said
        return found[0]

    assert (logs / "full.rc").read_text().strip() != "0"
    line = error_line("full.err")
    kept = (logs / "kept").read_text().split()
    assert len(kept) == 1, (logs / "full.ls").read_text()  # a checkpoint saved before the disk filled, complete
    assert re.search(r"train.py: error: saving checkpoint step_\d+ in --output_dir .* failed \(.*MB free there\)", line)
    assert f"the last complete checkpoint, {kept[0]!r}, is kept" in line and "--resume_from_checkpoint latest" in line
    assert ".tmp" not in (logs / "full.ls").read_text()  # the failed save's partial files removed
    assert json.loads((logs / "results.json").read_text())["eval_loss"] == pytest.approx(
        results(ref)["eval_loss"], rel=1e-6
    ), (logs / "resume.err").read_text()
    line = error_line("final.err")
    assert line.startswith("train.py: error: saving the final model in --output_dir") and "MB free there" in line
    assert line.endswith("no checkpoint of this run was saved: free space and run again"), line


def test_a_checkpoint_on_another_file_system_resumes_with_its_disk_slots(tmp_path):
    """Disk slots come into the run's directory as hard links from the checkpoint, which cannot cross file systems:
    resuming from a checkpoint on another device (here /dev/shm, a tmpfs) raised after the output directory was
    prepared. They are copied there; the resumed run ends where the uninterrupted one did."""
    shm = "/dev/shm"
    if not os.path.isdir(shm) or not os.access(shm, os.W_OK) or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another file system than the test's directory")
    flags = TINY + SEARCHING + ["--controller_slots", "disk", "--sample_tokens", "0"]
    other = tempfile.mkdtemp(dir=shm)
    try:
        launch(flags + ["--checkpointing_steps", "4", "--output_dir", os.path.join(other, "run")])
        ckpt = os.path.join(other, "run", "step_8")
        with open(os.path.join(ckpt, "train_state.json")) as f:
            held = json.load(f)["slots"]
        assert any(not s["same_as_checkpoint"] for s in held.values()), held  # a slot with files of its own
        out = str(tmp_path / "resumed")
        launch(flags + ["--output_dir", out, "--resume_from_checkpoint", ckpt])
        assert results(out)["eval_loss"] == results(os.path.join(other, "run"))["eval_loss"]
    finally:
        shutil.rmtree(other, ignore_errors=True)
