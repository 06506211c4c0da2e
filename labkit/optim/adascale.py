"""AdaScale SGD: a learning rate that adapts to the batch size (Johnson et al., ICML 2020).

Training at S times the base batch averages S gradients of the base batch. If they were all the
same (no noise), one large step would be worth one small step; if they were pure noise around a
small mean, it would be worth S small steps. AdaScale measures where it is between the two, with
the gain ratio

    r = (σ² + μ²) / (σ²/S + μ²)          1 ≤ r ≤ S

μ² = ‖E g‖² (signal), σ² = E‖g − E g‖² (noise of one base-batch gradient). It multiplies the
learning rate by r, and counts progress in "scale-invariant iterations": τ ← τ + r per step, so
that a run at scale S can follow the base run's schedule lr(τ) and stop when τ reaches its length.

Estimating σ² and μ² costs one tiny all-reduce. With n = world_size × micro-batches local
gradients gᵢ (each on a base batch when S = n) and their mean ḡ (what DDP leaves in ``p.grad``):

    E[mean ‖gᵢ‖²] = μ² + σ²_n        E[‖ḡ‖²] = μ² + σ²_n / n        (σ²_n: noise of one gᵢ)
    σ²_n ≈ n/(n−1) · (mean ‖gᵢ‖² − ‖ḡ‖²),  σ² = σ²_n · S/n,  μ² ≈ ‖ḡ‖² − σ²/S

Both are smoothed by a debiased moving average (one estimate per step is noisy). The local norms
must be taken *before* averaging: a tensor hook on each parameter sees the local gradient before
torch's or labkit's DDP (both act after the gradient is accumulated) replace it with the mean.
"""

from __future__ import annotations


from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.optim import Optimizer
from torch.autograd import Variable

from labkit import comm

__all__ = ["AdaScale"]


class AdaScale(Optimizer):
    """Wrap ``optimizer`` (SGD in the paper; any works): ``step()`` multiplies each group's learning
    rate by its gain for that step. Use it wherever the wrapped optimizer was used, LR schedulers
    included (they see the base rate).

    ``scale``: S, the batch-size multiple over the base batch (default: world size × micro-batches).
    ``num_gradients_to_accumulate``: backward passes per step; each loss is assumed divided by it
    (the usual accumulation). ``smoothing``: weight of the past in the moving averages (default,
    as fairscale: max(0, 1 − n/1000)); it remembers about 1/(1 − smoothing) steps, so in a short run
    the reported gain lags the true one: pass a smaller value there.

    Every backward pass through the wrapped parameters is counted as one of the step's micro-batches
    (its hooks cannot tell training from analysis): call ``remove_hooks()`` before backward passes
    that are not training, or run them on a copy of the model.
    """

    def __init__(self, optimizer: Optimizer, world_size: int | None = None, scale: float | None = None,
                 smoothing: float | None = None, num_gradients_to_accumulate: int = 1, process_group=None):
        if world_size is None:
            world_size = dist.get_world_size(process_group) if dist.is_initialized() else 1
        self.world_size, self.group = world_size, process_group
        self.accumulate = num_gradients_to_accumulate
        self.samples = world_size * num_gradients_to_accumulate      # n local gradients per step
        if num_gradients_to_accumulate < 1:
            raise ValueError(f"num_gradients_to_accumulate must be >= 1, got {num_gradients_to_accumulate}")
        if self.samples < 2:
            raise ValueError("AdaScale estimates the gradient noise from the spread of several local gradients: "
                             "it needs world_size × num_gradients_to_accumulate >= 2")
        self.scale = float(self.samples if scale is None else scale)
        if not self.scale >= 1:
            raise ValueError(f"scale must be >= 1, got {scale!r}")
        self.smoothing = max(0.0, 1.0 - self.samples / 1000) if smoothing is None else smoothing
        if not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing!r}")
        self.optimizer = optimizer
        # Share the wrapped optimizer's groups and state: a scheduler on either changes the same lr.
        super().__init__(optimizer.param_groups, {})
        self.state = optimizer.state
        n_groups = len(self.param_groups)
        self.progress = 0.0            # τ: scale-invariant iterations done
        self.steps = 0
        self._avg = {"var": [0.0] * n_groups, "sqr": [0.0] * n_groups, "weight": 0.0}
        self._gains = [1.0] * n_groups
        self._local_sqr = None         # Σ over this rank's backward passes of ‖local grad‖², per group
        self._backwards = 0
        self._counting = False
        self._handles = [p.register_hook(lambda grad, i=i: self._on_local_grad(i, grad))
                         for i, group in enumerate(self.param_groups) for p in group["params"]
                         if p.requires_grad]

    # --- during backward: the local gradients -------------------------------------------------------

    def _on_local_grad(self, group_index: int, grad: torch.Tensor) -> None:
        if self._local_sqr is None:
            self._local_sqr = torch.zeros(len(self.param_groups), dtype=torch.float64, device=grad.device)
        if not self._counting:         # first hook of this backward pass: count the pass once
            self._counting = True
            Variable._execution_engine.queue_callback(self._on_backward_end)
        self._local_sqr[group_index] += grad.detach().double().pow(2).sum()
        return None

    def _on_backward_end(self) -> None:
        self._counting = False
        self._backwards += 1

    # --- at step: estimate, smooth, scale the learning rate -----------------------------------------

    def gain(self, group_index: int | None = None) -> float:
        """The gain r of the last step (of one group; default: from the groups' summed estimates)."""
        if group_index is not None:
            return self._gains[group_index]
        var, sqr = sum(self._smoothed("var")), sum(self._smoothed("sqr"))
        return self._ratio(var, sqr)

    def _ratio(self, var: float, sqr: float) -> float:
        if var + sqr == 0:
            return 1.0
        return (var + sqr) / (var / self.scale + sqr)

    def _smoothed(self, name: str) -> list[float]:
        weight = self._avg["weight"]
        return [x / weight if weight else 0.0 for x in self._avg[name]]

    def _estimate(self) -> None:
        if self._backwards != self.accumulate or self._local_sqr is None:
            raise RuntimeError(f"AdaScale.step() after {self._backwards} backward pass(es) since the last step; "
                               f"expected num_gradients_to_accumulate = {self.accumulate}")
        local = self._local_sqr
        if self.world_size > 1:
            comm.all_reduce(local, group=self.group)          # Σᵢ ‖gᵢ‖² over the ranks
        local = local * self.accumulate ** 2                  # each loss was divided by the micro-batch count
        total = [sum(p.grad.detach().double().pow(2).sum() for p in group["params"] if p.grad is not None)
                 for group in self.param_groups]              # ‖ḡ‖², ḡ the averaged gradient
        n, S = self.samples, self.scale
        beta = self.smoothing
        self._avg["weight"] = beta * self._avg["weight"] + (1 - beta)
        for i, (local_i, total_i) in enumerate(zip(local.tolist(), total)):
            total_i = float(total_i)
            var = n / (n - 1) * (local_i / n - total_i) * S / n     # σ² of one base batch
            sqr = total_i - var / S                                 # μ²
            var, sqr = max(var, 0.0), max(sqr, 0.0)                 # estimates of positive numbers
            self._avg["var"][i] = beta * self._avg["var"][i] + (1 - beta) * var
            self._avg["sqr"][i] = beta * self._avg["sqr"][i] + (1 - beta) * sqr
        self._gains = [self._ratio(v, s) for v, s in zip(self._smoothed("var"), self._smoothed("sqr"))]
        self._local_sqr, self._backwards = None, 0

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        if closure is not None:
            raise ValueError("AdaScale.step does not take a closure: the gain needs the backward passes "
                             "to have run before step()")
        self._estimate()
        base = [group["lr"] for group in self.param_groups]
        for group, gain in zip(self.param_groups, self._gains):
            group["lr"] *= gain
        try:
            self.optimizer.step()
        finally:
            for group, lr in zip(self.param_groups, base):
                group["lr"] = lr
        self.progress += self.gain()
        self.steps += 1

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["adascale"] = dict(progress=self.progress, steps=self.steps, gains=list(self._gains),
                                 avg={k: (list(v) if isinstance(v, list) else v) for k, v in self._avg.items()})
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        ours = state_dict.pop("adascale")
        super().load_state_dict(state_dict)
        # torch rebuilt the groups and the state: share them with the wrapped optimizer again
        self.optimizer.param_groups, self.optimizer.state = self.param_groups, self.state
        self.progress, self.steps, self._gains = ours["progress"], ours["steps"], list(ours["gains"])
        self._avg = {k: (list(v) if isinstance(v, list) else v) for k, v in ours["avg"].items()}

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
