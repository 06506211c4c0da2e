"""Where the bytes of a training step go, predicted and measured (issue 17's foundation).

Per rank, a step keeps five kinds of tensors:

    parameters      Ψ numbers in the compute dtype
    gradients       Ψ numbers, one per parameter
    optimizer state Adam's m and v (2Ψ), SGD's momentum (Ψ), plain SGD nothing
    master weights  with mixed precision, an fp32 copy of the parameters (4Ψ bytes)
    activations     what autograd saves in the forward for the backward: grows with batch × sequence

ZeRO (Rajbhandari et al. 2020) divides the first four by the data-parallel degree N: stage 1 the optimizer
state and master weights, stage 2 also the gradients, stage 3 also the parameters.

The activations of labkit's GPT (labkit.models.gpt), counted from what each operation saves, for a micro-batch
of b sequences of s tokens, width h, a heads, per layer (dropout 0):

    LayerNorm inputs          2·bsh         c_attn input            bsh
    Q, K, V (copies for bmm)  3·bsh         softmax output          a·b·s²   (flash attention: a·b·s, the
    c_proj input              bsh           c_fc input              bsh       log-sum-exp, and Q, K, V as one
    GELU input                4·bsh         MLP c_proj input        4·bsh     3bsh tensor)

that is 16·bsh + a·b·s² numbers per layer (Korthikanti et al. 2022 count the same for GPT-3, plus dropout masks),
plus the LayerNorms' mean and 1/σ (2·bs each) and the causal mask (s² booleans). With tensor parallelism of degree t the
parts inside the parallel region are split: 4·bsh + (12·bsh + a·b·s²)/t. Full recomputation keeps only each
layer's input (bsh) and recomputes the rest in the backward; selective recomputation (Korthikanti et al.)
recomputes only the attention core softmax(QKᵀ/√d)·V, whose saved tensors grow with s², and keeps 16·bsh. The head adds the final LayerNorm's and lm_head's
inputs (2·bsh) and the log-softmax output (b·s·V).

:func:`predict` is the formula; :func:`measure` runs one step on this process and sums what really exists
(each tensor storage counted once): the lesson shows both side by side, and the tests hold them within 1 %.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from labkit.models import GPT, GPTConfig

__all__ = ["Setup", "Memory", "num_parameters", "predict", "activation_bytes", "measure", "recompute_blocks", "recompute_attention",
           "step_flops"]

_OPTIMIZER_STATES = {"adam": 2, "sgd_momentum": 1, "sgd": 0}   # state tensors per parameter


@dataclass(frozen=True)
class Setup:
    """How one rank trains: the micro-batch, the dtypes, the optimizer and the parallel degrees."""
    batch: int                      # b: sequences per micro-batch
    seq_len: int                    # s: tokens per sequence
    dtype_bytes: int = 4            # parameters, gradients and activations (2 under bf16 mixed precision)
    mixed_precision: bool = False   # master weights (a copy the optimizer updates) beside the parameters
    state_bytes: int = 0            # per number of optimizer state and master: 0 = 4 (fp32) with mixed precision,
                                    # else dtype_bytes
    optimizer: str = "adam"         # "adam" | "sgd_momentum" | "sgd"
    dp: int = 1                     # data-parallel degree N (what ZeRO divides by)
    zero: int = 0                   # ZeRO stage 0..3
    tp: int = 1                     # tensor-parallel degree t
    pp: int = 1                     # pipeline stages p (1F1B: the first stage holds p micro-batches)
    micro_batches: int = 1          # m, micro-batches per step (with pp > 1)
    recompute: str = "none"         # "none" | "selective" (the attention core) | "full" (every block)
    flash: bool = False             # fused attention: saves a·b·s instead of a·b·s²

    def __post_init__(self):
        if self.optimizer not in _OPTIMIZER_STATES:
            raise ValueError(f"optimizer must be one of {sorted(_OPTIMIZER_STATES)}, got {self.optimizer!r}")
        if self.zero not in (0, 1, 2, 3):
            raise ValueError(f"zero must be a ZeRO stage 0..3, got {self.zero}")
        if self.recompute not in ("none", "selective", "full"):
            raise ValueError(f"recompute must be 'none', 'selective' or 'full', got {self.recompute!r}")
        if self.state_bytes < 0:
            raise ValueError(f"state_bytes must be 0 (the default) or positive, got {self.state_bytes}")
        for name in ("batch", "seq_len", "dtype_bytes", "dp", "tp", "pp", "micro_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class Memory:
    """Bytes per rank, by kind."""
    parameters: float
    gradients: float
    optimizer: float
    master: float
    activations: float

    @property
    def total(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self))

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"total": self.total}


def activation_bytes(config: GPTConfig, setup: Setup) -> float:
    """What autograd keeps from one micro-batch's forward, in bytes, on one rank (see the module's table)."""
    if config.dropout:
        raise ValueError("the activation formula assumes dropout = 0 (dropout adds a mask per dropout layer)")
    b, s, h, a, V = setup.batch, setup.seq_len, config.n_embd, config.n_head, config.vocab_size
    t, e = setup.tp, setup.dtype_bytes
    if setup.recompute == "full":
        layer = b * s * h * e                                   # only the block's input
    else:
        if setup.recompute == "selective":
            attention = 0                                       # recomputed: only Q, K, V (in the 12·bsh) kept
        else:
            attention = a * b * s if setup.flash else a * b * s * s
        layer = (4 * b * s * h + (12 * b * s * h + attention) / t) * e
        layer += 2 * 2 * b * s * e                              # two LayerNorms' mean and 1/σ
        if not setup.flash and setup.recompute == "none":
            layer += s * s                                      # the causal mask (bool, ~mask[:s, :s]), for masked_fill
    layers_here = config.n_layer / setup.pp
    in_flight = min(setup.pp, setup.micro_batches)              # 1F1B: the first stage holds p micro-batches
    # final LayerNorm and lm_head inputs, log-softmax output, the loss; token ids, targets, positions (int64)
    head = (2 * b * s * h + 2 * b * s + b * s * V + 1) * e + (2 * b * s + s) * 8
    return layers_here * in_flight * layer + head


def num_parameters(config: GPTConfig) -> int:
    """Ψ of labkit's GPT without building it: per block 12h² (the four linear maps) + 13h (their biases and two
    LayerNorms), the token embedding (tied with the head) V·h, the position embedding block·h, the final LayerNorm."""
    h, bias = config.n_embd, int(config.bias)
    block = 12 * h * h + (9 * bias + 2 + 2 * bias) * h
    return config.n_layer * block + (config.vocab_size + config.block_size) * h + (1 + bias) * h


def predict(config: GPTConfig, setup: Setup, num_params: int | None = None) -> Memory:
    """Bytes per rank of a training step of labkit's GPT under ``setup``. ``num_params``: Ψ, by default the
    model's (:func:`num_parameters`); tensor and pipeline parallelism divide it evenly (an approximation:
    embeddings and LayerNorms are not split the same way)."""
    psi = (num_params if num_params is not None else num_parameters(config)) / (setup.tp * setup.pp)
    n = setup.dp
    state_bytes = setup.state_bytes or (4 if setup.mixed_precision else setup.dtype_bytes)
    optimizer = _OPTIMIZER_STATES[setup.optimizer] * psi * state_bytes
    master = state_bytes * psi if setup.mixed_precision else 0.0
    return Memory(parameters=psi * setup.dtype_bytes / (n if setup.zero >= 3 else 1),
                  gradients=psi * setup.dtype_bytes / (n if setup.zero >= 2 else 1),
                  optimizer=optimizer / (n if setup.zero >= 1 else 1),
                  master=master / (n if setup.zero >= 1 else 1),
                  activations=activation_bytes(config, setup))


# --------------------------------------------------------------------------------------------
# Measured: what exists after one step on this process
# --------------------------------------------------------------------------------------------

def _storage_bytes(tensors) -> dict:
    """{storage address: bytes}: views of one storage count once."""
    out = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            t = t.to_local() if hasattr(t, "to_local") else t       # a DTensor (torch's FSDP): this rank's part
            st = t.untyped_storage()
            out[st.data_ptr()] = st.nbytes()
    return out


def measure(model: torch.nn.Module, optimizer, loss_fn: Callable[[torch.nn.Module], torch.Tensor]) -> Memory:
    """One step of ``model`` on this process: the activations are what the forward saves for the backward
    (saved-tensor hooks; the parameters themselves are not counted twice), then the parameters, gradients and
    optimizer state as they exist after ``loss_fn(model).backward()`` and ``optimizer.step()``. ``optimizer``: a
    torch optimizer, or a wrapper with ``.optimizer`` and fp32 ``.master`` copies (labkit.mixed_precision)."""
    params = _storage_bytes(model.parameters())
    saved: dict = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(model)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    grads = _storage_bytes(p.grad for p in model.parameters() if p.grad is not None)
    inner = getattr(optimizer, "optimizer", optimizer)
    state = _storage_bytes(v for s in (inner.state.values() if inner else ()) for v in s.values()
                           if isinstance(v, torch.Tensor) and v.dim() > 0)   # not the 0-dim step counters
    master = _storage_bytes(getattr(optimizer, "master", ()))
    return Memory(parameters=sum(params.values()), gradients=sum(grads.values()), optimizer=sum(state.values()),
                  master=sum(master.values()), activations=sum(saved.values()))


def recompute_blocks(model: GPT) -> GPT:
    """Full activation recomputation: every block runs under ``torch.utils.checkpoint`` (non-reentrant), so its
    forward keeps only its input and the backward runs the block again. Changes ``model`` in place."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        forward = block.forward
        block.forward = lambda x, forward=forward: checkpoint(forward, x, use_reentrant=False)
    return model


def recompute_attention(model: GPT) -> GPT:
    """Selective recomputation: every attention core (``CausalSelfAttention.attend``) runs under
    ``torch.utils.checkpoint``; its s²-sized softmax is recomputed in the backward. Changes ``model`` in place."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        attend = block.attn.attend
        block.attn.attend = lambda q, k, v, attend=attend: checkpoint(attend, q, k, v, use_reentrant=False)
    return model


def step_flops(config: GPTConfig, setup: Setup) -> float:
    """Matrix-product FLOPs of one training step on one micro-batch: forward F, backward 2F, plus what
    recomputation runs again. Per layer F = 24·bsh² + 4·bs²h (the four linear maps, then Q Kᵀ and A V of the
    written-out attention); the head 2·bshV. torch's checkpoint stops recomputing as soon as it has every
    tensor the backward needs, so a recomputed region's last product is not run again: selective recomputation
    reruns Q Kᵀ only (2·bs²h per layer), full recomputation the block but its last linear map (F − 8·bsh²)."""
    b, s, h, V = setup.batch, setup.seq_len, config.n_embd, config.vocab_size
    layer = 24 * b * s * h * h + 4 * b * s * s * h
    forward = config.n_layer * layer + 2 * b * s * h * V
    again = {"none": 0, "selective": 2 * b * s * s * h, "full": layer - 8 * b * s * h * h}[setup.recompute]
    return 3 * forward + config.n_layer * again


def relative_error(predicted: float, measured: float) -> float:
    return math.inf if measured == 0 and predicted else (abs(predicted - measured) / measured if measured else 0.0)
