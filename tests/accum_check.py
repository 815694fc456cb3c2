"""Launched by tests/test_train.py on 2 processes: after train.set_grad_accum(1 -> 2) mid-run, the gradient
DeepSpeed steps with is the mean over 2 micro-batches x 2 ranks, the same as a run that used accumulation 2
from the start (checked against a hand-computed gradient on a plain copy of the model).
    accelerate launch --config_file accelerate_config.yaml --num_processes 2 tests/accum_check.py
"""

import copy
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from accelerate import Accelerator, DeepSpeedPlugin
from accelerate.utils import InitProcessGroupKwargs
from transformers import GPT2Config, GPT2LMHeadModel

import train

with open(os.path.join(ROOT, "ds_config.json")) as f:
    ds = json.load(f)
ds.update(gradient_clipping=1e9, train_micro_batch_size_per_gpu=2)
acc = Accelerator(
    deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds, gradient_accumulation_steps=1),
    gradient_accumulation_steps=1,
    kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")],
)
torch.manual_seed(0)
model = GPT2LMHeadModel(
    GPT2Config(
        n_embd=16, n_layer=1, n_head=2, n_positions=8, vocab_size=50, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
)
reference = copy.deepcopy(model)
engine, _ = acc.prepare(model, torch.optim.SGD(model.parameters(), lr=0.0))  # lr 0: the weights stay put


def batch(k):
    g = torch.Generator().manual_seed(100 + 10 * acc.process_index + k)
    return torch.randint(0, 50, (2, 8), generator=g)


def micro_steps(ks):
    syncs = []
    for k in ks:
        with acc.accumulate(engine):
            x = batch(k)
            acc.backward(engine(input_ids=x, labels=x).loss)
            syncs.append(acc.sync_gradients)
    return syncs


assert micro_steps([0]) == [True]
train.set_grad_accum(acc, engine, 2)
assert micro_steps([1, 2]) == [False, True], "Accelerate's boundary did not follow the new accumulation"
got = float(engine.get_global_grad_norm())

# by hand: mean of the two micro-batch losses on every rank, averaged over ranks
loss = sum(reference(input_ids=batch(k), labels=batch(k)).loss for k in (1, 2)) / 2
grads = torch.autograd.grad(loss, list(reference.parameters()))
flat = torch.cat([g.flatten() for g in grads])
torch.distributed.all_reduce(flat)
expected = float((flat / acc.num_processes).norm())
assert abs(got - expected) <= 1e-4 * expected, (got, expected)
assert abs(got - expected / 2) > 0.1 * expected  # a half-scaled gradient (the classic bug) would be caught
acc.print(f"ACCUM OK deepspeed grad norm {got:.6f} expected {expected:.6f}")
acc.end_training()
if torch.distributed.is_initialized():  # a clean exit: gloo threads left running abort the process at exit
    torch.distributed.destroy_process_group()
