"""Drive train.py's main() in-process with faults injected into the model's training forward passes.

Not a test by itself: tests/test_reliability.py launches it like train.py, e.g.
    FAULT_CALLS=5,9 FAULT_KIND=nan FAULT_RANK=1 accelerate launch --num_processes 2 tests/faulty_run.py --output_dir out ...
FAULT_CALLS: 1-based training forward calls (on that rank) whose loss becomes NaN (or inf); FAULT_RANK: which rank (default all).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers import GPT2LMHeadModel

import train

BAD = {int(x) for x in os.environ.get("FAULT_CALLS", "").split(",") if x}
VALUE = float(os.environ.get("FAULT_KIND", "nan"))
RANK = os.environ.get("FAULT_RANK")
calls = 0
original = GPT2LMHeadModel.forward


def faulty_forward(self, *args, **kwargs):
    global calls
    out = original(self, *args, **kwargs)
    if self.training and kwargs.get("labels") is not None:
        calls += 1
        if calls in BAD and (RANK is None or RANK == os.environ.get("RANK", "0")):
            out.loss = out.loss * VALUE
            print(f"[fault] rank {os.environ.get('RANK', '0')} call {calls}: loss set to {VALUE}", flush=True)
    return out


GPT2LMHeadModel.forward = faulty_forward

if __name__ == "__main__":
    train.main()
