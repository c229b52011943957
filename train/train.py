"""The editable baseline: a small modern GPT trained for a fixed budget (nanoGPT/autoresearch style).

Searchers edit this file: classical ones only the ALL_CAPS knobs below, an agent anything. The
fixed harness runs it in a sandbox (its own scratch folder, no network, no view of the study or the
validation data) and relies on two functions:

    build_model(vocab_size) -> nn.Module   forward(idx: LongTensor[B, T]) -> logits [B, T, vocab_size].
        It must be causal (logits at t may depend on idx[:, :t+1] only) and exportable: after
        train() the harness exports it with torch.export at batch 1 and any length T from 2 to
        run.eval_seq_len, so forward is tensor operations only (no .item(), no Python branch on a
        tensor's values, no randomness), returns the logits and changes no state of the model.
    train(model, run) -> None               train `model` in place and return once run.step(loss)
        says the budget is spent.

`run` is train/run.py (the one other file to read): run.device, run.vocab_size, run.eval_seq_len,
run.batches(batch_size, seq_len) (train split only), run.step(loss) -> bool, run.progress (0..1 of
the budget: seconds, steps, tokens or CPU seconds), run.autocast(), run.compile(model),
run.log(**values). The harness serves the batches and counts the steps, tokens and time itself,
then scores the exported model (a pure tensor program, evaluated by the trusted side, each row on
its own) with prepare.py's val_bpb at the objective's eval_seq_len; nothing printed, returned or
written here counts.

The values below are the gpu preset (~50M parameters for an 8192 vocab, one H100, 300 s);
conf/objective/cpu.yaml writes the cpu preset's values over them. No SEED knob: the seed belongs
to the trial (trial.json), so replicates of one candidate differ only by it and no searcher can
tune a lucky draw. No sliding-window attention (autoresearch's WINDOW_PATTERN): SDPA's flash
kernel takes only is_causal, and a window mask would push every layer onto a slower kernel.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# Model
DEPTH = 8  # transformer blocks
ASPECT_RATIO = 80  # model_dim = DEPTH * ASPECT_RATIO, rounded up to a multiple of HEAD_DIM
HEAD_DIM = 128
MLP_RATIO = 4
ROPE_BASE = 10000.0
SOFTCAP = 15.0  # logits = SOFTCAP * tanh(logits / SOFTCAP); 0 turns it off

# Batch: TOTAL_BATCH_SIZE tokens per optimizer step, accumulated over forward/backward passes
# of DEVICE_BATCH_SIZE sequences of SEQ_LEN tokens
SEQ_LEN = 2048
DEVICE_BATCH_SIZE = 64
TOTAL_BATCH_SIZE = 2**19

# Optimization: Muon for the 2-D weights inside the blocks, AdamW for everything else. The
# embedding and unembedding rates are for a 768-wide model and scale as 1/sqrt(model_dim / 768),
# so that a change of width keeps them sensible.
MATRIX_LR = 0.04
EMBEDDING_LR = 0.6
UNEMBEDDING_LR = 0.004
SCALAR_LR = 0.5
WEIGHT_DECAY = 0.2  # decoupled, on the Muon weights only
MUON_MOMENTUM = 0.95
ADAM_BETAS = (0.8, 0.95)

# Learning-rate schedule over run.progress: linear warmup, constant, linear warmdown
WARMUP_RATIO = 0.0
WARMDOWN_RATIO = 0.5
FINAL_LR_FRAC = 0.0


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(seq_len, head_dim):
    inv_freq = ROPE_BASE ** -(torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]  # [1, T, 1, head_dim/2]


def apply_rotary(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim, head_dim):
        super().__init__()
        self.n_head, self.head_dim = dim // head_dim, head_dim
        self.c_q = nn.Linear(dim, dim, bias=False)
        self.c_k = nn.Linear(dim, dim, bias=False)
        self.c_v = nn.Linear(dim, dim, bias=False)
        self.c_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_head, self.head_dim)
        # QK-norm; back to v's dtype, since autocast may run the norm in fp32 and SDPA needs one dtype
        q = norm(apply_rotary(q, cos, sin)).type_as(v)
        k = norm(apply_rotary(k, cos, sin)).type_as(v)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.c_fc = nn.Linear(dim, MLP_RATIO * dim, bias=False)
        self.c_proj = nn.Linear(MLP_RATIO * dim, dim, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, dim, head_dim):
        super().__init__()
        self.attn = CausalSelfAttention(dim, head_dim)
        self.mlp = MLP(dim)

    def forward(self, x, cos, sin):
        x = x + self.attn(norm(x), cos, sin)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, vocab_size, depth, dim, head_dim):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(Block(dim, head_dim) for _ in range(depth))
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        # Each block reads a learned mix of the residual stream and the first layer's input.
        self.resid_lambdas = nn.Parameter(torch.ones(depth))
        self.x0_lambdas = nn.Parameter(torch.full((depth,), 0.1))
        self.head_dim = head_dim
        self.init_weights(dim)

    @torch.no_grad()
    def init_weights(self, dim):
        bound = (3 / dim) ** 0.5  # uniform with std 1/sqrt(dim)
        nn.init.normal_(self.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for block in self.blocks:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(linear.weight, -bound, bound)
            # Residual branches start as the identity.
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)

    def forward(self, idx):
        # The rotary tables are made for the length at hand, so any length scores (val_bpb is
        # measured at the objective's eval_seq_len, and the causality check runs shorter rows).
        cos, sin = rotary_tables(idx.size(1), self.head_dim)
        cos, sin = cos.to(idx.device), sin.to(idx.device)
        x = x0 = norm(self.wte(idx))
        for i, block in enumerate(self.blocks):
            x = block(self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0, cos, sin)
        logits = self.lm_head(norm(x)).float()
        return SOFTCAP * torch.tanh(logits / SOFTCAP) if SOFTCAP else logits


def build_model(vocab_size):
    dim = math.ceil(DEPTH * ASPECT_RATIO / HEAD_DIM) * HEAD_DIM
    return GPT(vocab_size, DEPTH, dim, HEAD_DIM)


def newton_schulz(g, steps=5):
    """An approximate orthogonalisation of g (U V^T of its SVD) by a quintic iteration."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz: SGD-momentum whose update for each 2-D weight is
    replaced by its nearest semi-orthogonal matrix, so every direction moves at the same rate."""

    def __init__(self, params, lr, momentum, weight_decay):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - group["momentum"])
                update = newton_schulz(p.grad.lerp(buf, group["momentum"]))  # Nesterov
                scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-group["lr"] * scale)


def lr_multiplier(progress):
    if progress < WARMUP_RATIO:
        return progress / WARMUP_RATIO
    if progress <= 1 - WARMDOWN_RATIO:
        return 1.0
    cooldown = (1 - progress) / WARMDOWN_RATIO
    return cooldown + (1 - cooldown) * FINAL_LR_FRAC


def train(model, run):
    matrices = [p for p in model.blocks.parameters() if p.ndim == 2]
    muon = Muon(matrices, lr=MATRIX_LR, momentum=MUON_MOMENTUM, weight_decay=WEIGHT_DECAY)
    width_scale = (model.wte.embedding_dim / 768) ** -0.5
    adamw = torch.optim.AdamW(
        [
            dict(params=model.wte.parameters(), lr=EMBEDDING_LR * width_scale),
            dict(params=model.lm_head.parameters(), lr=UNEMBEDDING_LR * width_scale),
            dict(params=[model.resid_lambdas, model.x0_lambdas], lr=SCALAR_LR),
        ],
        betas=ADAM_BETAS,
        eps=1e-10,
        weight_decay=0.0,
        fused=run.device.type == "cuda",
    )
    optimizers = (muon, adamw)
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]

    accum_steps = max(1, TOTAL_BATCH_SIZE // (DEVICE_BATCH_SIZE * SEQ_LEN))
    batches = run.batches(DEVICE_BATCH_SIZE, SEQ_LEN)
    forward = run.compile(model)
    while True:
        total_loss = 0.0
        for _ in range(accum_steps):
            x, y = next(batches)
            with run.autocast():
                logits = forward(x)
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
            (loss / accum_steps).backward()
            total_loss += loss.detach()
        multiplier = lr_multiplier(run.progress)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * multiplier
            opt.step()
        model.zero_grad(set_to_none=True)
        if run.step(total_loss / accum_steps):
            return
