"""Run train.py's main() in-process with faults injected into the model's training forward passes.

Not a test by itself: tests/test_reliability.py launches it like train.py, e.g.
    FAULT_CALLS=5,9 FAULT_KIND=nan FAULT_RANK=1 \
        accelerate launch --num_processes 2 tests/faulty_run.py --output_dir out ...
FAULT_CALLS: 1-based training forward calls (on that rank) whose loss becomes NaN (or inf); FAULT_RANK: which rank
(default all). FAULT_EVAL_CALLS: 1-based evaluation forward calls (one per validation batch) whose logits become NaN
(or inf), as weights that diverged would give. The fault is a forward hook on whatever model train.py builds, so any
causal LM works.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train

BAD = {int(x) for x in os.environ.get("FAULT_CALLS", "").split(",") if x}
BAD_EVAL = {int(x) for x in os.environ.get("FAULT_EVAL_CALLS", "").split(",") if x}
VALUE = float(os.environ.get("FAULT_KIND", "nan"))
RANK = os.environ.get("FAULT_RANK")
calls = eval_calls = 0


def inject(module, args, kwargs, output):
    global calls, eval_calls
    if not module.training:
        eval_calls += 1
        if eval_calls in BAD_EVAL:
            output.logits = output.logits * VALUE
            print(f"[fault] eval call {eval_calls}: logits set to {VALUE}", flush=True)
    elif kwargs.get("labels") is not None:
        calls += 1
        if calls in BAD and (RANK is None or RANK == os.environ.get("RANK", "0")):
            output.loss = output.loss * VALUE
            print(f"[fault] rank {os.environ.get('RANK', '0')} call {calls}: loss set to {VALUE}", flush=True)
    return output


def build_faulty_model(args, build=train.build_model_and_tokenizer):
    model, tokenizer = build(args)
    model.register_forward_hook(inject, with_kwargs=True)
    return model, tokenizer


train.build_model_and_tokenizer = build_faulty_model

if __name__ == "__main__":
    train.main()
