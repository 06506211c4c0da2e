"""LAMB: Adam's update, rescaled per layer by a trust ratio (You et al., ICLR 2020, Algorithm 2).

For each parameter tensor θ (a "layer") with gradient g, at step t:

    m ← β1·m + (1−β1)·g                 v ← β2·v + (1−β2)·g²          (Adam's moments)
    m̂ = m / (1−β1ᵗ)                     v̂ = v / (1−β2ᵗ)               (bias correction)
    r = m̂ / (√v̂ + ε)                                                  (Adam's direction)
    u = r + λ·θ                                                        (weight decay *inside*)
    θ ← θ − η · φ(‖θ‖) / ‖u‖ · u                                       (the trust ratio)

with φ the identity and the ratio taken as 1 when ‖θ‖ or ‖u‖ is 0. Every layer moves by η·‖θ‖ in
norm, whatever the scale of its gradient: that is what lets LAMB train with huge batches, where
a single global learning rate is too large for some layers and too small for others.

Variants, as options:
- ``bias_correction=False``: m and v used as they are (the NVIDIA and torch_optimizer versions);
- ``max_weight_norm=10``: φ(z) = min(z, 10), the clamp of the authors' first public code
  (torch_optimizer's ``clamp_value``);
- per group ``adapt=False`` (ratio 1: plain Adam) and ``weight_decay=0``: the usual exclusion of
  biases and normalisation weights, see :func:`lamb_param_groups`.

Three code paths give the same result: ``foreach=True`` (default) updates many tensors per call with
``torch._foreach_*`` kernels (all of a group's tensors on a GPU; on a CPU, runs of about a million
elements, so that the temporaries are reused); ``foreach=False`` is the formula above, tensor by tensor;
``fused=True`` compiles the step into two passes over memory (labkit.optim.lamb_fused: the fast path
on GPUs; the first step of each param group compiles it, one block of the model at a time, once for
all the blocks that repeat). After each step, ``optimizer.state[p]["trust_ratio"]`` holds the ratio
used for ``p``.
"""

from __future__ import annotations

import math
import warnings

from collections.abc import Callable

import torch
from torch import nn
from torch.optim import Optimizer

from labkit.optim.hyperparameters import check_hyperparameters

__all__ = ["Lamb", "lamb_param_groups", "lamb_direction"]


class Lamb(Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01, *, bias_correction: bool = True,
                 max_weight_norm: float | None = None, adapt: bool = True, foreach: bool = True,
                 fused: bool = False):
        check_hyperparameters("Lamb", lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                              max_weight_norm=max_weight_norm)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, max_weight_norm=max_weight_norm, adapt=adapt)
        super().__init__(params, defaults)
        self.foreach, self.fused = foreach, fused
        # fused: one compiled call per repeated block; False: the whole group in one call (what
        # labkit.bench.optim's lamb-fused-whole compares)
        self.fused_units = True
        self._units = {}      # the calls of each list of tensors, by their ids (see _fused_calls)

    # torch's Optimizer pickles (and deep-copies) only defaults, state and param groups: the paths too
    _PATHS = dict(foreach=True, fused=False, fused_units=True)

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), **{name: getattr(self, name) for name in self._PATHS}}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__({**self._PATHS, **state})
        self._units = {}

    def add_param_group(self, param_group: dict) -> None:
        # Groups given as dicts (e.g. by lamb_param_groups) are checked too.
        check_hyperparameters("Lamb", **{k: param_group[k] for k in ("lr", "betas", "eps", "weight_decay")
                                         if k in param_group},
                              max_weight_norm=param_group.get("max_weight_norm"))
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("Lamb does not support sparse gradients")
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
            if self.fused:
                self._group_step_fused(group, params)
            else:
                (self._group_step_foreach if self.foreach else self._group_step_readable)(group, params)
        return loss

    # --- the formula, one tensor at a time ----------------------------------------------------------

    def _group_step_readable(self, group: dict, params: list) -> None:
        for p in params:
            state = self.state[p]
            update = lamb_direction(p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"], group)
            ratio = self._trust_ratio(p.norm(), update.norm(), group)
            state["trust_ratio"] = ratio
            p.sub_(group["lr"] * ratio * update)

    @staticmethod
    def _trust_ratio(weight_norm: torch.Tensor, update_norm: torch.Tensor, group: dict) -> torch.Tensor:
        """φ(‖θ‖)/‖u‖, and 1 where either norm is 0 (or the group does not adapt). Works elementwise."""
        if not group["adapt"]:
            return torch.ones_like(weight_norm)
        if group["max_weight_norm"] is not None:
            weight_norm = weight_norm.clamp(max=group["max_weight_norm"])
        usable = (weight_norm > 0) & (update_norm > 0)
        return torch.where(usable, weight_norm / torch.where(usable, update_norm, 1), 1)

    # --- the same, all tensors of the group at once ---------------------------------------------------

    def _group_step_foreach(self, group: dict, params: list) -> None:
        # On a CPU, a chunk of the group's tensors at a time (see _foreach_chunks); elsewhere, all at once.
        for chunk in _foreach_chunks(params):
            self._chunk_step_foreach(group, chunk)

    def _chunk_step_foreach(self, group: dict, params: list) -> None:
        """The formula on whole tensors, each ``torch._foreach_*`` call one pass over all of them.

        A step costs mostly memory traffic, so it is written to take few passes and few temporaries:
        the bias corrections are folded into one number per tensor instead of passes of their own,
        and the step is applied by one multiply-add (23 elements read or written per parameter, as
        timm's foreach path; 31 before, see docs/optim-benchmark.md).
        """
        beta1, beta2 = group["betas"]
        states = [self.state[p] for p in params]
        grads = [p.grad for p in params]
        ms = [s["exp_avg"] for s in states]
        vs = [s["exp_avg_sq"] for s in states]
        # Adam's moments. m + (1−β1)·(g − m) is β1·m + (1−β1)·g, in one pass instead of two.
        torch._foreach_lerp_(ms, grads, 1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
        # Adam's direction with the corrections folded in (t may differ between tensors, hence lists):
        #   r = m̂/(√v̂ + ε) = c · m/(√v + ε') with ε' = ε·√(1−β2ᵗ), c = √(1−β2ᵗ)/(1−β1ᵗ)
        if group["bias_correction"]:
            root = [math.sqrt(1 - beta2 ** s["step"]) for s in states]
            eps = [group["eps"] * r for r in root]
            c = [r / (1 - beta1 ** s["step"]) for r, s in zip(root, states)]
        else:
            eps, c = [group["eps"]] * len(params), [1.0] * len(params)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_add_(denom, eps)
        # u = r + λ·θ
        if group["weight_decay"] != 0:
            update = torch._foreach_mul(params, group["weight_decay"])   # λ·θ, then + c·m/denom
            torch._foreach_addcdiv_(update, ms, denom, c)
        else:
            update = torch._foreach_div(ms, denom)
            torch._foreach_mul_(update, c)
        del denom
        if group["adapt"]:
            ratios = self._trust_ratio(torch.stack(torch._foreach_norm(params)),
                                       torch.stack(torch._foreach_norm(update)), group)
        else:
            ratios = torch.ones(len(params), dtype=params[0].dtype, device=params[0].device)
        for s, ratio in zip(states, ratios.unbind()):
            s["trust_ratio"] = ratio
        # θ ← θ + (−η·ratio)·u, the factor one 0-dim tensor per tensor (no wait for the GPU on the ratios)
        torch._foreach_addcmul_(params, update, (-group["lr"] * ratios).unbind())


    # --- the same, compiled into two passes over memory (labkit.optim.lamb_fused) ----------------------

    def _group_step_fused(self, group: dict, params: list) -> None:
        from torch._dynamo.exc import FailOnRecompileLimitHit
        from labkit.optim.lamb_fused import compiled_fused_lamb_step, step_scalars

        by_step = {}      # tensors by step count (normally all of a group's tensors share one)
        for p in params:
            by_step.setdefault(self.state[p]["step"], []).append(p)
        calls = [(step, [ps[i] for i in unit]) for step, ps in by_step.items() for unit in self._fused_calls(ps)]
        scalars = {step: step_scalars(group["lr"], step, group, ps[0].device,
                                      torch.promote_types(ps[0].dtype, torch.float32))
                   for step, ps in by_step.items()}
        for i, (step, ps) in enumerate(calls):
            states = [self.state[p] for p in ps]
            try:
                ratios = compiled_fused_lamb_step()(
                    ps, [p.grad for p in ps], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                    scalars[step], adapt=group["adapt"])
            except _compile_failures() as error:
                # raised while compiling, before this call ran (the calls before it are done): its
                # tensors and the rest take the foreach path, from now on
                why = ("torch.compile has compiled the fused step for as many shape lists as its recompile_limit "
                       "allows (torch._dynamo.config.recompile_limit)" if isinstance(error, FailOnRecompileLimitHit)
                       else f"torch.compile failed ({_first_line(getattr(error, 'inner_exception', error))})")
                warnings.warn(f"Lamb(fused=True): {why}; this optimizer continues with the foreach path",
                              RuntimeWarning, stacklevel=3)
                self.fused, self.foreach = False, True
                self._group_step_foreach(group, [p for _, rest in calls[i:] for p in rest])   # not those done
                return
            for s, ratio in zip(states, ratios.unbind()):
                s["trust_ratio"] = ratio

    def _fused_calls(self, params: list) -> list[list[int]]:
        """The tensors of each compiled call, one per repeated block (lamb_fused.compile_units), as
        indices into ``params``. Found once per list of tensors: reading the shapes of the 1 B model's
        338 tensors took 0.36 ms here, a few % of its step at a GPU's bandwidth floor. Kept by the
        tensors' ids: should one change shape, any cut into calls is still the same step (each
        tensor's update is its own)."""
        if not self.fused_units:
            return [list(range(len(params)))]
        from labkit.optim.lamb_fused import compile_units
        key = tuple(map(id, params))
        if key not in self._units:
            if len(self._units) >= 16:      # lists that keep changing (gradients that come and go)
                self._units.clear()
            self._units[key] = compile_units(params)
        return self._units[key]


def _compile_failures() -> tuple:
    """What torch.compile raises while compiling, before the call runs: out of versions, a backend that
    failed (no C++ compiler), and inductor's own for no Triton or a GPU too old for it (not wrapped)."""
    from torch._dynamo import exc as dynamo
    from torch._inductor import exc as inductor
    return (dynamo.FailOnRecompileLimitHit, dynamo.BackendCompilerFailed,
            *(getattr(inductor, name) for name in ("TritonMissing", "GPUTooOldForTriton") if hasattr(inductor, name)))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:300] if text else ''}"


def lamb_direction(p: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int,
                   group: dict) -> torch.Tensor:
    """u = r + λ·θ for one tensor (or any slice of it: every element's u depends on that element only), with
    Adam's moments m and v updated in place. ``group``: betas, eps, weight_decay, bias_correction."""
    beta1, beta2 = group["betas"]
    m.mul_(beta1).add_(grad, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    if group.get("bias_correction", True):
        m_hat, v_hat = m / (1 - beta1 ** step), v / (1 - beta2 ** step)
    else:
        m_hat, v_hat = m, v
    update = m_hat / (v_hat.sqrt() + group["eps"])
    if group["weight_decay"] != 0:
        update = update + group["weight_decay"] * p
    return update


# Elements per chunk of the foreach path on a CPU (whole tensors; a larger tensor is a chunk alone).
# An out-of-place foreach call allocates its results (denom, update) for all the tensors it is
# given: for a whole 100 M-parameter model, 800 MB of fresh memory per step, which the CPU's
# allocator mostly gets back from the operating system page by page (a page fault for every 4 KiB,
# and the kernel zeroes each page). Temporaries of a few MB are reused from one chunk to the next
# instead, and a chunk's tensors may still be in the cache from one pass to the next. Measured on 2
# cores (docs/optim-benchmark.md): 2.7x faster at 100 M parameters, 2x at 10 M. On a GPU, torch's
# caching allocator already reuses memory and each chunk would cost a dozen more kernel launches:
# no chunks there.
CPU_CHUNK_ELEMENTS = 2 ** 20


def _foreach_chunks(params: list) -> list:
    """Consecutive runs of ``params`` of at most CPU_CHUNK_ELEMENTS elements each (on a CPU), or one run."""
    if not params or params[0].device.type != "cpu":
        return [params]
    chunks, current, size = [], [], 0
    for p in params:
        if current and size + p.numel() > CPU_CHUNK_ELEMENTS:
            chunks.append(current)
            current, size = [], 0
        current.append(p)
        size += p.numel()
    return chunks + [current]


def lamb_param_groups(model: nn.Module, weight_decay: float = 0.01, exclude=None) -> list[dict]:
    """Two parameter groups: weights (decayed, trust ratio on), and the parameters that ``exclude``
    selects (default: tensors of fewer than 2 dimensions, i.e. biases and LayerNorm/BatchNorm
    weights) with ``weight_decay=0`` and ``adapt=False``, as BERT's LAMB recipe does."""
    exclude = exclude or (lambda name, p: p.ndim < 2)
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain if exclude(name, p) else decay).append(p)
    groups = [dict(params=decay, weight_decay=weight_decay)]
    if plain:
        groups.append(dict(params=plain, weight_decay=0.0, adapt=False))
    return groups
