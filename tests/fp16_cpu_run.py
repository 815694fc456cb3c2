"""Run train.py's main() under fp16 on the CPU: DeepSpeed's fp16 path (its ZeRO optimizer and dynamic loss scaler,
run for real) on a machine without a GPU.

Not a test by itself: tests/test_reliability.py launches it like train.py. Two flags are forced, nothing else:
DeepSpeed's CPU accelerator reports fp16 as supported (torch runs float16 on the CPU, slowly), and train.py's check
that fp16 needs a GPU is passed over. Each step prints DeepSpeed's count of skipped steps ("[fp16] skipped_steps N").
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

import train

CPU_Accelerator.is_fp16_supported = lambda self: True
check_args, optimizer_step = train.check_args, train.optimizer_step


def check_args_on_cpu(args):
    precision, args.mixed_precision = args.mixed_precision, "no"
    try:
        return check_args(args)
    finally:
        args.mixed_precision = precision


def counted_step(accelerator, model, *rest):
    out = optimizer_step(accelerator, model, *rest)
    print(f"[fp16] skipped_steps {model.skipped_steps}", flush=True)
    return out


train.check_args, train.optimizer_step = check_args_on_cpu, counted_step

if __name__ == "__main__":
    train.main()
