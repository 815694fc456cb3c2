"""The GPU reference for train.py's tokens/s (docs/results.md "On a GPU"): the model train.py builds from
--config_overrides n_layer=12,n_embd=768,n_head=12 --block_size 1024 (GPT-2 124M on bytes, no dropout), batch 16,
in the plain loop a user writes: fp32 weights under bf16 autocast, torch's AdamW (betas 0.9, 0.95), clipping at 1.0,
loss.item() once per step (train.py syncs once per step too). Every step timed, the first included, as train.py's
train_tokens_per_s does. No Accelerate, no DeepSpeed.

    python docs/experiments/gpu_bare_loop.py STEPS     # prints "bare tokens/s X"
"""

import sys
import time

import torch
from transformers import AutoModelForCausalLM, ByT5Tokenizer, GPT2Config

steps, batch, block = int(sys.argv[1]), 16, 1024
torch.manual_seed(0)
tok = ByT5Tokenizer()
config = GPT2Config(
    n_embd=768,
    n_layer=12,
    n_head=12,
    n_positions=block,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    vocab_size=len(tok),
    bos_token_id=tok.eos_token_id,
    eos_token_id=tok.eos_token_id,
)
model = AutoModelForCausalLM.from_config(config).cuda()
opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.0)
data = torch.randint(3, 259, (steps, batch, block), device="cuda")
torch.cuda.synchronize()
total = 0.0
for i in range(steps):
    t0 = time.time()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=data[i], labels=data[i]).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    loss.item()
    total += time.time() - t0
print(f"peak GPU memory MB {torch.cuda.max_memory_allocated() / 2**20:.0f}")
print(f"bare tokens/s {steps * batch * block / total:.1f}")
