"""A small GPT, nanoGPT-style: the model that lessons 3 onwards train on several processes.

    idx (B, T) token ids
    → token embedding + position embedding                       (B, T, C)
    → n_layer × Block:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))   (pre-LayerNorm, GPT-2)
    → final LayerNorm → lm_head (the token embedding, transposed)  (B, T, vocab_size) logits

Attention is written out from its formula, softmax(Q Kᵀ / √d_k) · V with a causal mask, so that it
can be read in a lecture; ``GPTConfig(flash=True)`` uses PyTorch's fused
``F.scaled_dot_product_attention`` instead (faster on GPUs, same result).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPTConfig", "GPT", "CausalSelfAttention", "MLP", "Block"]

# name: (n_layer, n_head, n_embd, block_size). Parameter counts for the 78 characters of Botchan.
PRESETS = {
    "tiny": (2, 4, 48, 64),      # ~63 K: tests, notebooks and the CPU lab's default; learns in seconds
    "small": (4, 4, 128, 128),   # ~0.8 M: a longer CPU lab run (minutes)
    "medium": (8, 6, 384, 128),  # ~14 M: big enough that the gradient all-reduce costs real time
    "gpu": (12, 12, 768, 256),   # ~85 M: GPT-2 small's shape (with a character vocabulary)
}


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int = 64      # the longest sequence the model reads (its context window)
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64          # C, the width of the residual stream; each head has C / n_head
    dropout: float = 0.0
    bias: bool = True         # biases in the Linear layers and LayerNorms
    flash: bool = False       # F.scaled_dot_product_attention instead of the written-out attention

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def preset(cls, name: str, vocab_size: int, **overrides) -> "GPTConfig":
        """A named size: "tiny", "small", "medium" or "gpu"; ``overrides`` change any field."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; the presets are {', '.join(PRESETS)}")
        n_layer, n_head, n_embd, block_size = PRESETS[name]
        fields = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size)
        return cls(vocab_size=vocab_size, **{**fields, **overrides})


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.flash = config.n_head, config.flash
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        # mask[t, s] is True where position t may look at position s (s <= t). Not persistent: it is
        # not learned, so it stays out of the state_dict (and out of checkpoints and broadcasts).
        mask = torch.tril(torch.ones(config.block_size, config.block_size, dtype=torch.bool))
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) → (B, n_head, T, d_k): every head attends on its own slice of the channels.
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = self.attend(q, k, v)                                            # (B, nh, T, d_k)
        y = y.transpose(1, 2).contiguous().view(B, T, C)                    # heads side by side
        return self.resid_dropout(self.c_proj(y))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(Q Kᵀ / √d_k) · V, causal: the part whose saved tensors grow with T² (what selective
        recomputation, labkit.memory.recompute_attention, recomputes in the backward)."""
        if self.flash:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                  dropout_p=self.attn_dropout.p if self.training else 0.0)
        T = q.size(-2)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))              # (B, nh, T, T)
        att = att.masked_fill(~self.mask[:T, :T], float("-inf"))            # no peeking ahead
        att = self.attn_dropout(F.softmax(att, dim=-1))
        return att @ v


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))   # tokens exchange information
        x = x + self.mlp(self.ln_2(x))    # each token thinks on its own
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)   # token embedding
        self.wpe = nn.Embedding(config.block_size, config.n_embd)   # position embedding
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017): the output layer reuses the token embedding. One
        # Parameter in two places: it gets one gradient (the sum of both uses) and, in data
        # parallelism, one all-reduce.
        self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        # GPT-2: each block adds two outputs to the residual stream; scaling their projections by
        # 1/√(2·n_layer) keeps the stream's variance from growing with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor,
                targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab_size) and, given targets (B, T), the mean cross-entropy (else None)."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size={self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T))
        return logits, loss

    def num_params(self, non_embedding: bool = False) -> int:
        """Number of parameters; the tied token embedding / output weight counts once.

        ``non_embedding=True`` leaves out the position embeddings (a table lookup, no arithmetic).
        The token embedding stays in: it is also the output layer, a real matrix multiply
        (nanoGPT's convention)."""
        n = sum(p.numel() for p in self.parameters())   # parameters() yields a shared one once
        return n - self.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward), the estimate of the PaLM paper's
        appendix B (Chowdhery et al., 2022) used for model FLOPs utilisation (MFU):
        6·N for the weight matrix multiplies (2 forward, 4 backward, per parameter) with
        N = ``num_params(non_embedding=True)``, plus 12·n_layer·block_size·n_embd for attention's
        Q·Kᵀ and att·V over a full context window."""
        c = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layer * c.block_size * c.n_embd

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``idx`` (B, T), one at a time. Only the last
        ``block_size`` tokens are read. ``top_k`` keeps the k most likely tokens; ``generator``
        makes the sampling reproducible. Call ``model.eval()`` first when dropout > 0."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size:])
            logits = logits[:, -1, :] / temperature          # the prediction for the next token
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx
