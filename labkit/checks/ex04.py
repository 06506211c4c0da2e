"""Checkers for exercise 4, large-batch optimisers (``solutions/04_large_batch_exercise.ipynb``).

    check_lamb(lamb_step)                   # 4a: 50 steps against labkit.optim.Lamb, in this process
    check_adascale_gain(adascale_gain)      # 4b: on 3, 2 and 4 processes, against labkit.optim.AdaScale
    check_whole_norms(whole_norms)          # 4c: on 3 and 2 processes, against labkit.optim.whole_norms

Each prints one ``✓`` line when the code is right and raises :class:`labkit.checks.CheckFailed` naming
the mistake when it is not.

4a. ``lamb_step(params, grads, exp_avgs, exp_avg_sqs, step, *, lr, betas, eps, weight_decay)`` does one
LAMB step (You et al. 2020, Algorithm 2) on a list of tensors, in place, and returns the trust ratios. The
check trains a small float64 model for 50 steps with the student's function next to
``labkit.optim.Lamb`` (the readable path), on the same gradients: tensors of very different norms (one
above 10, one tiny, one that starts at exactly zero), weight decay 0.1. Then 3 steps without weight decay
where two tensors get a zero gradient (‖u‖ = 0: the ratio must be 1). At the first step where the student's
m, v, θ or trust ratios differ, the update is recomputed from the state before that step with each
known-wrong variant (:data:`LAMB_MISTAKES`, among them the source article's formula read with b = ‖θ‖, plus
the same formula read with b a constant, which the check solves for): the one that matches names the mistake.

4b. ``adascale_gain(grads, scale)`` runs on every rank with that rank's local gradients; it averages them
over the ranks in place (as DDP leaves them) and returns AdaScale's gain ratio, the same on every rank.
The check runs it on 3, 2 and 4 processes on known gradients (signal and noise; the same with S = 2N;
almost pure noise, where the estimate of μ² is negative and the gain is S; all zero, where the gain is 1)
and compares with ``labkit.optim.AdaScale`` (one step, no smoothing) on the same gradients, then with each
variant of :data:`GAIN_MISTAKES` (the norms taken after averaging, no n/(n−1), ...).

4c. ``whole_norms(shards)`` runs on every rank with that rank's slices of some tensors (ZeRO stage 1: each rank
keeps the optimizer state of one slice of every tensor) and returns the norms of the whole tensors, the same on
every rank. A design task: what to send, in how few messages. The check runs it on 3 and 2 processes (slices of
unequal length, one empty, a tensor of zeros) against ``labkit.optim.whole_norms``, counts the messages and the
numbers it sends (one message of one number per tensor is the design to find), names the variants of
:data:`NORM_MISTAKES` (local norms, the sum of the slices' norms, no square root, ...), then runs 3 steps of
``labkit.optim.sharded_lamb_step`` with it and compares with ``labkit.optim.Lamb`` on the whole tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from labkit.checks import (CheckFailed, describe, fail, first_mismatch, fmt_number, fmt_pair, passed, run_on_ranks,
                           time_limit)
from labkit.checks.harness import (Mistake, and_list, as_number, bound, call_student, close, close_number,
                                   element_text, find_mistake, need_function)

__all__ = ["check_lamb", "check_adascale_gain", "lamb_variant_step", "gain_formula", "labkit_gain", "gain_cases",
           "LambVariant", "LAMB_MISTAKES", "GAIN_MISTAKES", "WORLD_SIZES", "check_whole_norms", "norm_cases",
           "norms_formula", "NORM_MISTAKES", "NORM_WORLD_SIZES"]

_RTOL, _ATOL = 1e-9, 1e-12


# ============================================================================================
# 4a. LAMB
# ============================================================================================

LR, BETAS, EPS, WEIGHT_DECAY = 0.05, (0.9, 0.99), 1e-6, 0.1
STEPS = 50
ZERO_GRAD_STEPS = 3                                 # the second run: weight decay 0, two zero gradients
_ZERO_GRAD = ("hidden.bias", "out.bias")

# name, shape, scale of the initial values (0: starts at exactly zero)
_TENSORS = (("hidden.weight", (8, 5), 4.0),        # ‖θ‖ ≈ 25: above the clamp of 10 of some LAMB codes
            ("hidden.bias", (8,), 0.01),            # a tiny norm
            ("out.weight", (3, 8), 0.3),
            ("out.bias", (3,), 0.0))                # zero-initialised: ‖θ‖ = 0 at step 1, the ratio is 1


def _initial_params() -> list:
    g = torch.Generator().manual_seed(4)
    return [torch.randn(shape, generator=g, dtype=torch.float64) * scale for _, shape, scale in _TENSORS]


def _gradients(params: list, step: int) -> list:
    """The gradients of the small model's loss at ``params`` on batch ``step`` (a 2-layer tanh network
    fitting noisy targets; batches of 16)."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 5, generator=g, dtype=torch.float64)
    y = torch.sin(x[:, :3] * 2) + 0.3 * torch.randn(16, 3, generator=g, dtype=torch.float64)
    leaves = [p.detach().clone().requires_grad_(True) for p in params]
    w1, b1, w2, b2 = leaves
    loss = ((torch.tanh(x @ w1.t() + b1) @ w2.t() + b2 - y) ** 2).mean()
    return [g.detach() for g in torch.autograd.grad(loss, leaves)]


@dataclass(frozen=True)
class LambVariant:
    """One way of writing the LAMB step; the defaults are the paper's Algorithm 2."""
    bias_correction: bool = True
    corrected_in_place: bool = False      # m̂, v̂ written into the state (m, v) instead of new tensors
    weight_decay: str = "update"          # "update": u = r + λθ | "after_ratio": θ −= η(ratio_r·r + λθ)
                                          # | "after_step": θ −= η·ratio_r·r, then θ −= ηλθ (the new θ)
                                          # | "ratio_of_r": ratio ‖θ‖/‖r‖ applied to u | "gradient": g + λθ
    norm: str = "layer"                   # "layer" | "global": one ratio from the norms of all tensors
    eps: str = "outside"                  # "outside": √v̂ + ε | "none" | "inside": √(v̂ + ε)
    swapped_betas: bool = False
    ratio: str = "paper"                  # "paper" | "none": 1 | "inverted": ‖u‖/‖θ‖ | "clamp10": φ(z) = min(z, 10)
                                          # | "lars": ‖θ‖/(‖r‖ + λ‖θ‖), the source article's formula with b = ‖θ‖


def _ratio(w_norm: float, u_norm: float, kind: str) -> float:
    if kind == "none":
        return 1.0
    if kind == "clamp10":
        w_norm = min(w_norm, 10.0)
    if kind == "inverted":
        return u_norm / w_norm if w_norm > 0 and u_norm > 0 else 1.0
    return w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0


def lamb_variant_step(params, grads, exp_avgs, exp_avg_sqs, step, *, lr, betas, eps, weight_decay,
                      variant: LambVariant = LambVariant()):
    """One LAMB step as ``variant`` writes it, on copies: returns (params, exp_avgs, exp_avg_sqs, ratios).
    With the default variant, the same arithmetic as ``labkit.optim.Lamb(foreach=False)``."""
    beta1, beta2 = betas[::-1] if variant.swapped_betas else betas
    out_p, out_m, out_v, directions, rs = [], [], [], [], []
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        p, m, v = p.clone(), m.clone(), v.clone()
        if variant.weight_decay == "gradient":
            g = g + weight_decay * p
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        if variant.bias_correction:
            m_hat, v_hat = m / (1 - beta1 ** step), v / (1 - beta2 ** step)
        else:
            m_hat, v_hat = m, v
        if variant.corrected_in_place:
            m, v = m_hat, v_hat
        if variant.eps == "outside":
            r = m_hat / (v_hat.sqrt() + eps)
        elif variant.eps == "inside":
            r = m_hat / (v_hat + eps).sqrt()
        else:
            r = m_hat / v_hat.sqrt()
        u = r + weight_decay * p if variant.weight_decay in ("update", "ratio_of_r") else r
        out_p.append(p), out_m.append(m), out_v.append(v), directions.append(u), rs.append(r)
    if variant.norm == "global":
        w_norm = torch.cat([p.reshape(-1) for p in out_p]).norm().item()
        u_norm = torch.cat([u.reshape(-1) for u in directions]).norm().item()
        ratios = [_ratio(w_norm, u_norm, variant.ratio)] * len(out_p)
    else:
        norm_of = rs if variant.weight_decay in ("after_ratio", "after_step", "ratio_of_r") else directions
        ratios = [_ratio(p.norm().item(), u.norm().item(), variant.ratio) for p, u in zip(out_p, norm_of)]
        if variant.ratio == "lars":       # ‖r‖ + λ‖θ‖ in place of ‖u‖ = ‖r + λθ‖
            ratios = [_ratio(p.norm().item(), r.norm().item() + weight_decay * p.norm().item(), "paper")
                      for p, r in zip(out_p, rs)]
    for p, u, ratio in zip(out_p, directions, ratios):
        if variant.weight_decay == "after_ratio":
            p.sub_(lr * (ratio * u + weight_decay * p))
        elif variant.weight_decay == "after_step":
            p.sub_(lr * ratio * u)
            p.sub_(lr * weight_decay * p)
        else:
            p.sub_(lr * ratio * u)
    return out_p, out_m, out_v, ratios


_DIVIDE = "divide m by (1−β1ᵗ) and v by (1−β2ᵗ)"
# Tried in this order at the first step where the student's update is wrong; the tests build each one too.
LAMB_MISTAKES = (
    Mistake("no bias correction", LambVariant(bias_correction=False),
     f"your update equals LAMB without bias correction (m and v used as they are): {_DIVIDE} before "
     "r = m̂/(√v̂ + ε). The moments start at zero, so without the correction they are too small in the first "
     "steps (m = 0.1·g at step 1 with β1 = 0.9)."),
    Mistake("bias-corrected moments stored", LambVariant(corrected_in_place=True),
     "the bias-corrected m̂ and v̂ were written into exp_avgs and exp_avg_sqs: the state must keep m and v "
     "themselves. Compute m̂ = m / (1−β1ᵗ) and v̂ = v / (1−β2ᵗ) as new tensors (m_hat = m / (1 - beta1 ** step)), "
     "not with m.div_(...)."),
    Mistake("betas swapped", LambVariant(swapped_betas=True),
     "β1 and β2 are swapped: the first moment uses β1 (m ← β1·m + (1−β1)·g, β1 = 0.9 here) and the second "
     "β2 (v ← β2·v + (1−β2)·g², β2 = 0.99 here); betas = (beta1, beta2)."),
    Mistake("decay after the ratio (AdamW style)", LambVariant(weight_decay="after_ratio"),
     "weight decay was added after the trust ratio (θ ← θ − η·(‖θ‖/‖r‖·r + λθ), as AdamW decays). In LAMB it "
     "is part of the update, u = r + λθ, and the trust ratio ‖θ‖/‖u‖ scales the whole of u: "
     "θ ← θ − η·‖θ‖/‖u‖·u."),
    Mistake("decay after the step", LambVariant(weight_decay="after_step"),
     "weight decay was added after the trust ratio (θ ← θ − η·‖θ‖/‖r‖·r, then θ ← θ − ηλθ, as AdamW decays). In "
     "LAMB it is part of the update, u = r + λθ, and the trust ratio ‖θ‖/‖u‖ scales the whole of u: "
     "θ ← θ − η·‖θ‖/‖u‖·u."),
    Mistake("ratio from r, not u", LambVariant(weight_decay="ratio_of_r"),
     "the trust ratio was computed from ‖r‖, without the weight decay: it is ‖θ‖/‖u‖ with u = r + λθ, the "
     "update that is applied."),
    Mistake("the source's formula, b = ‖θ‖", LambVariant(ratio="lars"),
     "the trust ratio is ‖θ‖/(‖r‖ + λ‖θ‖): the source article's formula θ ← θ − η·(λθ + r)/(‖r‖/b + λ) with "
     "b = ‖θ‖, LARS's denominator on Adam's direction. ‖r‖ + λ‖θ‖ is only an upper bound of ‖u‖ = ‖r + λθ‖ (the "
     "triangle inequality), so each step comes out a little shorter than η·‖θ‖. Algorithm 2 divides by ‖u‖ "
     "itself: ratio = ‖θ‖/‖u‖."),
    Mistake("decay in the gradient (L2)", LambVariant(weight_decay="gradient"),
     "weight decay was added to the gradient (g + λθ before the moments, Adam's L2 regularisation). LAMB "
     "decouples it: the moments see g alone, and λθ is added to the update, u = r + λθ."),
    Mistake("one global ratio", LambVariant(norm="global"),
     "you used one norm over all tensors (a global trust ratio ‖θ‖/‖u‖ over the whole model) instead of one per "
     "tensor. LAMB's point is a ratio per layer: ratio_i = ‖θ_i‖/‖u_i‖, with the norms of tensor i only."),
    Mistake("no eps", LambVariant(eps="none"),
     "ε is missing: r = m̂ / (√v̂ + ε) (ε keeps the division finite where v̂ is tiny)."),
    Mistake("eps inside the root", LambVariant(eps="inside"),
     "ε is inside the square root: r = m̂ / (√v̂ + ε), not m̂ / √(v̂ + ε)."),
    Mistake("norm clamped at 10", LambVariant(ratio="clamp10"),
     "you clamped ‖θ‖ at 10 (φ(z) = min(z, 10), as the authors' first public code and torch_optimizer do); "
     "the paper's algorithm, and this exercise, use φ(z) = z: ratio = ‖θ‖/‖u‖."),
    Mistake("ratio inverted", LambVariant(ratio="inverted"),
     "the trust ratio is upside down: it is ‖θ‖/‖u‖ (the step then has norm η·‖θ‖), not ‖u‖/‖θ‖."),
    Mistake("no trust ratio", LambVariant(ratio="none"),
     "there is no trust ratio: this is Adam with weight decay, θ ← θ − η·u. LAMB multiplies u by "
     "‖θ‖/‖u‖ (1 when either norm is 0), so that every tensor moves by η·‖θ‖ whatever its gradient's scale."),
)


def _lamb_reference(params, weight_decay):
    """labkit.optim.Lamb on copies of ``params``: (optimizer, its parameters)."""
    from labkit.optim import Lamb

    mirror = [torch.nn.Parameter(p.clone()) for p in params]
    return Lamb(mirror, lr=LR, betas=BETAS, eps=EPS, weight_decay=weight_decay, foreach=False), mirror


def _ratios_returned(result, n: int, name: str, step: int) -> list:
    __tracebackhide__ = True
    if result is None:
        fail(f"{name} returned None at step {step}: return the list of trust ratios, one per tensor "
             f"({n} numbers here), e.g. ratios.append(ratio) in the loop and return ratios.")
    if isinstance(result, torch.Tensor) and result.dim() == 1:
        result = list(result.unbind())
    if not isinstance(result, (list, tuple)):
        fail(f"{name} returned {describe(result)} at step {step}: return the list of trust ratios, one number "
             f"per tensor ({n} here).")
    if len(result) != n:
        fail(f"{name} returned {len(result)} trust ratios at step {step} for {n} tensors: one per tensor, in the "
             f"order of params.")
    numbers = [as_number(x) for x in result]
    for i, (x, value) in enumerate(zip(result, numbers)):
        if value is None:
            fail(f"{name} returned {describe(x)} as the trust ratio of {_TENSORS[i][0]!r} (item {i}) at step "
                 f"{step}: each ratio is a number (a float, or a tensor of one element).")
    return numbers


def _close(a: torch.Tensor, b) -> bool:
    return close(a, b, _RTOL, _ATOL)


def _close_number(a: float, b: float) -> bool:
    return close_number(a, b, _RTOL, _ATOL)


def _element(label: str, want: torch.Tensor, got) -> str:
    return element_text(label, want, got, _RTOL, _ATOL)


def _all_close(wants, gots) -> bool:
    """Every tensor of every list in ``gots`` equals its counterpart in ``wants``."""
    return all(_close(a, b) for want, got in zip(wants, gots) for a, b in zip(want, got))


def _source_formula_b(before, after, ms, vs, step, weight_decay):
    """If θ ← θ − η·(λθ + r)/(‖r‖/b + λ) (r = m̂/(√v̂+ε): the source article's formula) explains every tensor
    for one constant b > 0 (or b = ∞): that b (math.inf for 1/b = 0); else None."""
    beta1, beta2 = BETAS
    inverse_bs = []
    for p0, p1, m, v in zip(before, after, ms, vs):
        if p1.shape != p0.shape or m.shape != p0.shape or v.shape != p0.shape:
            return None
        r = (m / (1 - beta1 ** step)) / ((v / (1 - beta2 ** step)).sqrt() + EPS)
        u, delta = r + weight_decay * p0, p0 - p1
        uu, rn = (u * u).sum().item(), r.norm().item()
        if uu == 0 or rn == 0:
            return None
        c = (delta * u).sum().item() / (LR * uu)          # delta = η·c·u, c = 1/(‖r‖/b + λ)
        if c <= 0 or (delta - LR * c * u).norm().item() > 1e-7 * delta.norm().item():
            return None
        inverse_bs.append((1 / c - weight_decay) / rn)
    if len(inverse_bs) < 2:
        return None
    first = inverse_bs[0]
    if first < -1e-9 or any(abs(x - first) > 1e-6 * max(abs(first), 1e-9) for x in inverse_bs):
        return None
    return math.inf if abs(first) <= 1e-9 else 1 / first


def _diagnose_lamb(name, step, run, before, grads, after, ms_after, vs_after, ratios, ref_p, ref_m, ref_v,
                   ref_ratios, weight_decay, grads_after) -> str | None:
    """None when the student's step equals the reference's; else what is wrong."""
    names = [n for n, _, _ in _TENSORS]
    head = f"{name} is wrong at step {step}{run}"
    p0, m0, v0 = before
    for i, (g, g_after) in enumerate(zip(grads, grads_after)):
        if not torch.equal(g, g_after):
            return (f"{head}: it changed grads[{i}] (the gradient of {names[i]!r}) in place. The gradient is an "
                    f"input: compute new tensors from it (and if you added λθ to it, that is Adam's L2 "
                    f"regularisation, not LAMB's weight decay, which goes into the update u = r + λθ).")
    all_right = _all_close((ref_p, ref_m, ref_v), (after, ms_after, vs_after))
    ratios_right = all(_close_number(a, b) for a, b in zip(ref_ratios, ratios))
    if all_right and ratios_right:
        return None

    # NaN or inf: 0/0 or x/0 in the trust ratio
    for i in range(len(names)):
        if not (math.isfinite(ratios[i]) and torch.isfinite(after[i]).all()):
            w, u = p0[i].norm().item(), _update(p0[i], ms_after[i], vs_after[i], step, weight_decay).norm().item()
            what = f"the trust ratio of {names[i]!r} is {fmt_number(ratios[i])}"
            if not torch.isfinite(after[i]).all():
                what += f" and its weights became {'nan' if torch.isnan(after[i]).any() else 'inf'}"
            if w == 0 or u == 0:
                zero = ("both ‖θ‖ and ‖u‖ are 0" if w == 0 and u == 0 else
                        "‖θ‖ = 0 (the tensor is all zeros)" if w == 0 else
                        "‖u‖ = 0 (zero gradient and no weight decay: nothing to do)")
                return (f"{head}: {what}. Here {zero}, and ‖θ‖/‖u‖ is {'0/0' if w == 0 and u == 0 else 'x/0'}. "
                        f"LAMB takes the ratio as 1 when either norm is 0: "
                        f"ratio = ‖θ‖/‖u‖ if ‖θ‖ > 0 and ‖u‖ > 0 else 1.")
            return f"{head}: {what}, although ‖θ‖ = {fmt_number(w)} and ‖u‖ = {fmt_number(u)} are both positive."

    # a known mistake, recomputed from the state before this step
    if not all_right:
        def gives_this(mistake: Mistake) -> bool:
            vp, vm, vv, _ = lamb_variant_step(p0, grads, m0, v0, step, lr=LR, betas=BETAS, eps=EPS,
                                              weight_decay=weight_decay, variant=mistake.variant)
            # a variant that does not differ from LAMB in this run (e.g. no decay to misplace) is not the mistake
            return not _all_close((vp, vm, vv), (ref_p, ref_m, ref_v)) and _all_close((vp, vm, vv),
                                                                                       (after, ms_after, vs_after))
        mistake = find_mistake(LAMB_MISTAKES, gives_this)
        if mistake:
            evidence = _evidence(names, ref_p, after, ref_m, ms_after, ref_v, vs_after, ref_ratios, ratios)
            return f"{head} ({evidence}): {mistake.says}"
        moments_right = _all_close((ref_m, ref_v), (ms_after, vs_after))
        if moments_right and weight_decay > 0:
            b = _source_formula_b(p0, after, ms_after, vs_after, step, weight_decay)
            if b is not None:
                return (f"{head}: this is the source article's formula θ ← θ − η·(λθ + r)/(‖r‖/b + λ) read with b "
                        f"a constant (b = {fmt_number(b) if math.isfinite(b) else '∞'}), not LAMB. Nothing in it "
                        f"involves ‖θ‖: each tensor moves by η·b·‖u‖/(‖r‖ + λb), a length set by b and ‖r‖, "
                        f"instead of the fraction η of its own norm, so the trust ratio is gone. In the source b is "
                        f"'a layer-wise adaptive scaling factor', φ(‖θ‖); LAMB (Algorithm 2) divides by ‖u‖: "
                        f"θ ← θ − η·‖θ‖/‖u‖·u.")
    # the zero-initialised tensor that did not move: ratio 0 at ‖θ‖ = 0
    for i in range(len(names)):
        if p0[i].norm().item() == 0 and ratios[i] == 0 and not _close(ref_p[i], after[i]):
            return (f"{head}: the trust ratio of {names[i]!r} is 0, and the tensor did not move. Its weights are all "
                    f"zero (‖θ‖ = 0: it was initialised to zero), so ‖θ‖/‖u‖ = 0, and it would never move at all. "
                    f"LAMB takes the ratio as 1 when either norm is 0: ratio = ‖θ‖/‖u‖ if ‖θ‖ > 0 and ‖u‖ > 0 "
                    f"else 1.")

    # no known mistake: the first quantity that is wrong, with the formula it should follow
    for i in range(len(names)):
        if not _close(ref_m[i], ms_after[i]):
            same = _close(m0[i], ms_after[i])
            return (f"{head}: {_element(f'exp_avgs[{i}] (m of {names[i]!r})', ref_m[i], ms_after[i])}. "
                    + ("It was not updated: change the tensor in exp_avgs in place (m.mul_(beta1).add_(g, alpha=1 - "
                       "beta1)); m = beta1 * m + ... makes a new tensor that the next step never sees."
                       if same else "m ← β1·m + (1−β1)·g, in place."))
    for i in range(len(names)):
        if not _close(ref_v[i], vs_after[i]):
            same = _close(v0[i], vs_after[i])
            return (f"{head}: {_element(f'exp_avg_sqs[{i}] (v of {names[i]!r})', ref_v[i], vs_after[i])}. "
                    + ("It was not updated: change the tensor in exp_avg_sqs in place (v.mul_(beta2).addcmul_(g, g, "
                       "value=1 - beta2))." if same else "v ← β2·v + (1−β2)·g² (elementwise square), in place."))
    for i in range(len(names)):
        if not _close(ref_p[i], after[i]):
            e, g = fmt_pair(ref_ratios[i], ratios[i])
            ratio_text = (f"the trust ratio you returned is right ({fmt_number(ratios[i])})"
                          if _close_number(ref_ratios[i], ratios[i])
                          else f"trust ratio expected {e}, got {g}")
            if _close(p0[i], after[i]):
                return (f"{head}: {names[i]!r} did not change ({ratio_text}). Update params[{i}] in place "
                        f"(p.sub_(lr * ratio * u), or p -= ...): p = p - ... makes a new tensor.")
            if _close_within(ref_p, after, 1e-6):
                return (f"{head}: {_element(f'params[{i}] ({names[i]!r})', ref_p[i], after[i])}; {ratio_text}. "
                        f"The difference is tiny (within a relative 1e-6), about the precision of float32: is a "
                        f"float32 number in your computation? torch.tensor(1.0) is float32: use Python floats "
                        f"(p.norm().item()) or tensors of p's dtype (torch.ones((), dtype=p.dtype)).")
            return (f"{head}: {_element(f'params[{i}] ({names[i]!r})', ref_p[i], after[i])}; {ratio_text}. "
                    f"m and v are right: check r = m̂/(√v̂ + ε) with m̂ = m/(1−β1ᵗ), v̂ = v/(1−β2ᵗ), u = r + λθ, "
                    f"ratio = ‖θ‖/‖u‖ (norms of this tensor, 1 when either is 0), θ ← θ − η·ratio·u.")
    for i in range(len(names)):
        if not _close_number(ref_ratios[i], ratios[i]):
            e, g = fmt_pair(ref_ratios[i], ratios[i])
            return (f"{head}: the parameters, m and v are right, but the trust ratio you returned for {names[i]!r} "
                    f"is {g}, expected {e}: return the ratio ‖θ‖/‖u‖ that you applied (θ the weights before the "
                    f"step, 1 when either norm is 0).")
    return f"{head}."  # not reached: something above differs


def _evidence(names, ref_p, after, ref_m, ms, ref_v, vs, ref_ratios, ratios) -> str:
    """The first wrong value, for a message: a parameter (with its trust ratio), else m, else v."""
    for label, want, got in (("", ref_p, after), ("m of ", ref_m, ms), ("v of ", ref_v, vs)):
        for i, n in enumerate(names):
            if not _close(want[i], got[i]):
                text = _element(f"{label}{n}", want[i], got[i])
                if label == "" and not _close_number(ref_ratios[i], ratios[i]):
                    e, g = fmt_pair(ref_ratios[i], ratios[i])
                    text += f"; its trust ratio: expected {e}, got {g}"
                return text
    return "the values differ"


def _close_within(want: list, got: list, rtol: float) -> bool:
    return all(a.shape == b.shape and first_mismatch(a, b, rtol, rtol * max(1.0, a.abs().max().item())) is None
               for a, b in zip(want, got))


def _update(p, m, v, step, weight_decay):
    beta1, beta2 = BETAS
    return (m / (1 - beta1 ** step)) / ((v / (1 - beta2 ** step)).sqrt() + EPS) + weight_decay * p


def _run_lamb(fn, name, steps, weight_decay, zero_grads, run) -> float:
    """The student's function next to labkit's Lamb for ``steps`` steps; the largest relative difference."""
    __tracebackhide__ = True
    params = _initial_params()
    ms = [torch.zeros_like(p) for p in params]
    vs = [torch.zeros_like(p) for p in params]
    reference, mirror = _lamb_reference(params, weight_decay)
    worst = 0.0
    for step in range(1, steps + 1):
        grads = _gradients(params, step)
        for i, (n, _, _) in enumerate(_TENSORS):
            if n in zero_grads:
                grads[i] = torch.zeros_like(grads[i])
        before = ([p.clone() for p in params], [m.clone() for m in ms], [v.clone() for v in vs])
        given = [g.clone() for g in grads]
        with torch.no_grad():  # fresh lists, as an optimizer builds them: only changes in place persist
            result = call_student(fn, list(params), given, list(ms), list(vs), step, lr=LR, betas=BETAS, eps=EPS,
                                      weight_decay=weight_decay, name=name, task="4a", where=f"at step {step}")
        ratios = _ratios_returned(result, len(params), name, step)
        for p, g in zip(mirror, grads):
            p.grad = g.clone()
        reference.step()
        ref_p = [p.detach().clone() for p in mirror]
        ref_m = [reference.state[p]["exp_avg"].clone() for p in mirror]
        ref_v = [reference.state[p]["exp_avg_sq"].clone() for p in mirror]
        ref_ratios = [float(reference.state[p]["trust_ratio"]) for p in mirror]
        problem = _diagnose_lamb(name, step, run, before, grads, params, ms, vs, ratios, ref_p, ref_m, ref_v,
                                 ref_ratios, weight_decay, given)
        if problem:
            fail(problem)
        for a, b in zip(ref_p, params):
            worst = max(worst, ((a - b).abs().max() / a.abs().max().clamp(min=1e-300)).item())
    return worst


def check_lamb(lamb_step) -> None:
    """Check exercise 4a: ``lamb_step(params, grads, exp_avgs, exp_avg_sqs, step, *, lr, betas, eps,
    weight_decay)`` does one LAMB step in place and returns the trust ratios.

    50 steps of a small float64 model next to ``labkit.optim.Lamb`` on the same gradients (lr 0.05,
    betas (0.9, 0.99), eps 1e-6, weight decay 0.1; tensors of norms about 25, 0.02, 1.5 and 0), then 3 steps
    without weight decay where two tensors get zero gradients. Compared after every step: the parameters,
    m and v (rtol 1e-9) and the returned trust ratios.
    """
    __tracebackhide__ = True
    name = need_function(lamb_step, "check_lamb")
    worst = _run_lamb(lamb_step, name, STEPS, WEIGHT_DECAY, (), "")
    _run_lamb(lamb_step, name, ZERO_GRAD_STEPS, 0.0, _ZERO_GRAD,
              " of the run without weight decay, where hidden.bias and out.bias get zero gradients")
    passed(f"{name} matches labkit.optim.Lamb (the paper's Algorithm 2) over {STEPS} steps on 4 tensors (one of norm "
           f"above 10, one tiny, one starting at zero), weight decay {fmt_number(WEIGHT_DECAY)}: parameters within "
           f"{bound(worst)}, m, v and the trust ratios equal; with zero gradients and no weight decay the ratio is 1")


# ============================================================================================
# 4b. AdaScale's gain ratio, on N processes
# ============================================================================================

WORLD_SIZES = (3, 2, 4)
_GRAD_SHAPES = ((4, 3), (3,), ())


def gain_cases(world_size: int) -> list[dict]:
    """The cases the check runs, in order: ``{"label", "scale", "grads"}`` with ``grads[r]`` rank r's local
    gradients (three float64 tensors)."""
    N = world_size
    g = torch.Generator().manual_seed(400 + N)

    def draw(scale):
        return [torch.randn(s, generator=g, dtype=torch.float64) * scale for s in _GRAD_SHAPES]

    mean = draw(1.0)
    noisy = [[m + d for m, d in zip(mean, draw(1.0))] for _ in range(N)]
    deviations = [draw(1.0) for _ in range(N - 1)]
    deviations.append([-sum(d[k] for d in deviations) for k in range(len(_GRAD_SHAPES))])
    noise = [[0.05 * m + d for m, d in zip(mean, dev)] for dev in deviations]
    zeros = [[torch.zeros(s, dtype=torch.float64) for s in _GRAD_SHAPES] for _ in range(N)]
    return [dict(label="signal and noise", scale=N, grads=noisy),
            dict(label=f"the same gradients with S = 2N = {2 * N} (each rank's gradient averages 2 base batches)",
                 scale=2 * N, grads=noisy),
            dict(label="mostly noise (the ranks' gradients nearly cancel)", scale=N, grads=noise),
            dict(label="every gradient zero", scale=N, grads=zeros)]


def labkit_gain(grads_per_rank: list, scale: float) -> float:
    """``labkit.optim.AdaScale``'s gain for one step (smoothing 0) on these local gradients, in this process:
    n = len(grads_per_rank) backward passes accumulated on one process are the same n local gradients."""
    from labkit.optim import AdaScale

    n = len(grads_per_rank)
    params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in _GRAD_SHAPES]
    opt = AdaScale(torch.optim.SGD(params, lr=0.0), world_size=1, scale=scale, smoothing=0.0,
                   num_gradients_to_accumulate=n)
    for local in grads_per_rank:
        (sum((p * g).sum() for p, g in zip(params, local)) / n).backward()   # p.grad += gᵢ/n
    opt.step()
    opt.remove_hooks()
    return opt.gain()


def _sq(tensors) -> float:
    return float(sum(t.double().pow(2).sum() for t in tensors))


def gain_formula(grads_per_rank: list, scale: float, *, after_averaging=False, bessel=True, signal_correction=True,
                 clamp=True, scale_seen=True, rescale_noise=True, sum_not_mean=False, own_rank=None) -> float:
    """The gain r = (σ² + μ²)/(σ²/S + μ²) from n local gradients, and its known-wrong variants:
    ``after_averaging`` (every local norm is ‖ḡ‖²), no ``bessel`` (no n/(n−1)), no ``signal_correction``
    (μ² = ‖ḡ‖²), no ``clamp`` at 0, not ``scale_seen`` (S = n), not ``rescale_noise`` (σ² = σ²_n),
    ``sum_not_mean`` (Σᵢ‖gᵢ‖² used as the mean), ``own_rank`` (that rank's ‖gᵢ‖² as the mean)."""
    n = len(grads_per_rank)
    S = float(n if not scale_seen else scale)
    mean = [sum(local[k] for local in grads_per_rank) / n for k in range(len(grads_per_rank[0]))]
    total = _sq(mean)
    if after_averaging:
        local_mean = total
    elif own_rank is not None:
        local_mean = _sq(grads_per_rank[own_rank])
    else:
        local_mean = sum(_sq(local) for local in grads_per_rank) * (1 if sum_not_mean else 1 / n)
    noise_n = (n / (n - 1) if bessel else 1.0) * (local_mean - total)
    var = noise_n * S / n if rescale_noise else noise_n
    sqr = total - var / S if signal_correction else total
    if clamp:
        var, sqr = max(var, 0.0), max(sqr, 0.0)
    if var + sqr == 0:
        return 1.0
    if var / S + sqr == 0:
        return math.inf
    return (var + sqr) / (var / S + sqr)


GAIN_MISTAKES = (
    Mistake("norms after averaging", dict(after_averaging=True),
     "the gain was computed from the averaged gradient: the local norms must be taken before the all-reduce. "
     "After it every rank holds ḡ, so every \"local\" ‖gᵢ‖² is ‖ḡ‖², the estimated noise σ² is 0 and the gain "
     "is always 1. Compute ‖gᵢ‖² (sum over the tensors of g.pow(2).sum()) first, then all-reduce the gradients."),
    Mistake("sum of squared norms as their mean", dict(sum_not_mean=True),
     "Σᵢ‖gᵢ‖² (the all-reduced sum of the local squared norms) was used as their mean: divide it by n."),
    Mistake("no n/(n-1)", dict(bessel=False),
     "the noise estimate lacks the factor n/(n−1): σ²_n ≈ n/(n−1)·(mean ‖gᵢ‖² − ‖ḡ‖²) (mean ‖gᵢ‖² − ‖ḡ‖² alone "
     "is biased low, by the factor (n−1)/n, like a variance divided by n instead of n−1)."),
    Mistake("mu^2 = |mean g|^2", dict(signal_correction=False),
     "μ² was taken as ‖ḡ‖²; but ‖ḡ‖² also holds the noise of the average, E‖ḡ‖² = μ² + σ²/S: μ² ≈ ‖ḡ‖² − σ²/S."),
    Mistake("S = n", dict(scale_seen=False),
     "the scale S was ignored (S = n, the world size, was used): use the argument scale for S, in σ² = "
     "σ²_n·S/n and in the gain (σ² + μ²)/(σ²/S + μ²)."),
    Mistake("sigma_n^2 as sigma^2", dict(rescale_noise=False),
     "σ²_n, the noise of one rank's gradient, was used as σ², the noise of one base batch: a rank's gradient "
     "averages S/n base batches, so σ² = σ²_n·S/n."),
    Mistake("no clamp at 0", dict(clamp=False),
     "the estimates were not clamped at 0: σ² and μ² are estimates of positive numbers, and with few ranks "
     "μ² ≈ ‖ḡ‖² − σ²/S comes out negative when the gradients nearly cancel. Take max(σ², 0) and max(μ², 0) "
     "(then the gain stays between 1 and S)."),
)


def _gain_worker(student_fn, name: str, seconds: float) -> list:
    rank, N = dist.get_rank(), dist.get_world_size()
    records = []
    for case in gain_cases(N):
        grads = [g.clone() for g in case["grads"][rank]]
        originals = list(grads)
        try:
            with time_limit(seconds, f"{name} did not return within {seconds:g} s on rank {rank} (N={N} ranks, "
                                     f"case: {case['label']}): an endless loop?"):
                returned = student_fn(grads, case["scale"])
        except (NotImplementedError, CheckFailed):
            raise
        except Exception as exc:  # noqa: BLE001 - the student's error: run_on_ranks shows it, with this note
            if hasattr(exc, "add_note"):  # Python >= 3.11: printed at the end of the traceback
                exc.add_note(f"(in the case: {case['label']}, scale = {case['scale']}"
                             + ("; the gain is 1 when σ² + μ² = 0, e.g. when every gradient is zero)"
                                if isinstance(exc, ZeroDivisionError) else ")"))
            raise
        records.append(dict(
            gain=as_number(returned), returned=describe(returned),
            originals=[t.detach().clone() for t in originals],
            listed=[t.detach().clone() if isinstance(t, torch.Tensor) else None for t in grads]))
    return records


def _diagnose_gain(name: str, N: int, per_rank: list) -> str | None:
    for c, case in enumerate(gain_cases(N)):
        head = f"{name} is wrong on {N} processes (case: {case['label']}, scale S = {case['scale']})"
        records = [per_rank[r][c] for r in range(N)]
        for r, rec in enumerate(records):
            if rec["gain"] is None:
                return (f"{name} returned {rec['returned']} on rank {r} ({N} processes): return the gain, one number "
                        f"(a float, or a tensor of one element), the same on every rank.")
        grads = case["grads"]
        mean = [sum(local[k] for local in grads) / N for k in range(len(_GRAD_SHAPES))]
        # the gradients: averaged in place, as DDP leaves them
        for r, rec in enumerate(records):
            for k, (want, got) in enumerate(zip(mean, rec["originals"])):
                if _close(want, got):
                    continue
                listed = rec["listed"][k]
                if isinstance(listed, torch.Tensor) and _close(want, listed):
                    kept = "the local gradient" if _close(grads[r][k], got) else "something else"
                    return (f"{head}: on rank {r}, grads[{k}] was replaced by a new tensor holding the average; the "
                            f"tensor that was passed in still holds {kept}. "
                            f"Average in place (dist.all_reduce(g); g.div_(n)): the gradients are the parameters' "
                            f".grad tensors, which the optimizer reads.")
                text = _element(f"rank {r}, grads[{k}]", want, got)
                if _close(grads[r][k], got):
                    return (f"{head}: after your function, {text}: it is still rank {r}'s own gradient. Average "
                            f"the gradients over the ranks in place (dist.all_reduce(g), then g.div_(n)), as DDP "
                            f"leaves them, so that the optimizer step that follows uses ḡ.")
                if _close(want * N, got):
                    return (f"{head}: after your function, {text}: the sum over the {N} ranks, not the mean. "
                            f"dist.all_reduce sums: divide by n = {N}.")
                return f"{head}: after your function, {text}: it must hold the average of the ranks' gradients."
        gains = [rec["gain"] for rec in records]
        expected = labkit_gain(grads, case["scale"])
        if any(not _close_number(x, gains[0]) for x in gains):
            values = ", ".join(f"rank {r}: {fmt_number(x)}" for r, x in enumerate(gains))
            own = all(_close_number(gain_formula(grads, case["scale"], own_rank=r), x) for r, x in enumerate(gains))
            return (f"{head}: the gain differs between the ranks ({values}; expected {fmt_number(expected)} on every "
                    f"rank). " + ("Each rank used its own ‖gᵢ‖² as the mean of the local squared norms: all-reduce "
                                  "the local squared norm (a one-element tensor) and divide by n." if own else
                                  "Every rank must compute the same estimate, from all-reduced quantities only."))
        got = gains[0]
        if _close_number(expected, got):
            continue
        e, g = fmt_pair(expected, got)
        text = f"{head}: the gain is {g}, expected {e} (labkit.optim.AdaScale's, one step, no smoothing)"
        if math.isnan(got):
            return (f"{text}. nan: 0/0? When σ² + μ² = 0 (e.g. every gradient zero) the gain is 1.")
        mistake = find_mistake(GAIN_MISTAKES, lambda m: _close_number(gain_formula(grads, case["scale"], **m.variant),
                                                                      got))
        if mistake:
            return f"{text}: {mistake.says}"
        if _close_number(1 / expected, got):
            return f"{text}: the ratio is upside down: r = (σ² + μ²)/(σ²/S + μ²), between 1 and S."
        if not 1 - 1e-9 <= got <= case["scale"] * (1 + 1e-9):
            return f"{text}: the gain must lie between 1 and S = {case['scale']} (with σ² ≥ 0 and μ² ≥ 0)."
        return (f"{text}. With n = {N} local gradients gᵢ and their mean ḡ: σ²_n = n/(n−1)·(mean ‖gᵢ‖² − ‖ḡ‖²), "
                f"σ² = σ²_n·S/n, μ² = ‖ḡ‖² − σ²/S, both clamped at 0, r = (σ² + μ²)/(σ²/S + μ²).")
    return None


def check_adascale_gain(adascale_gain, *, world_sizes=WORLD_SIZES, timeout: float = 10.0) -> None:
    """Check exercise 4b: ``adascale_gain(grads, scale)``, called on every rank with that rank's local gradients
    (a list of float64 tensors), averages them over the ranks in place and returns AdaScale's gain ratio.

    On each world size, four cases of known gradients (signal and noise; the same with S = 2N; nearly pure
    noise; all zero); the gain is compared with ``labkit.optim.AdaScale`` (one step, smoothing 0) on the same
    gradients (rtol 1e-9), and the gradients afterwards with their mean. ``timeout``: seconds before a rank
    that waits in a collective is stopped."""
    __tracebackhide__ = True
    name = need_function(adascale_gain, "check_adascale_gain")
    gains = {}
    for N in world_sizes:
        per_rank = run_on_ranks(_gain_worker, adascale_gain, name, 0.6 * timeout, world_size=N, timeout=timeout,
                                name=name, task="4b")
        problem = _diagnose_gain(name, N, per_rank)
        if problem:
            fail(problem)
        gains[N] = per_rank[0][0]["gain"]
    sizes = sorted(world_sizes)
    shown = ", ".join(f"{fmt_number(round(gains[n], 3))} on {n}" for n in sizes)
    passed(f"{name} matches labkit.optim.AdaScale on {and_list(sizes)} processes (gain with signal and noise: "
           f"{shown}; with S = 2N, nearly pure noise (gain S) and zero gradients (gain 1) too), and leaves every "
           f"rank's gradients averaged in place")


# ============================================================================================
# 4c. LAMB on sharded optimizer state: the whole tensors' norms from each rank's slices
# ============================================================================================

NORM_WORLD_SIZES = (3, 2)
# name, shape, scale of the values (0: all zero). On 3 ranks "small" (2 elements) leaves one rank an empty slice.
_NORM_TENSORS = (("weight", (5, 4), 3.0), ("bias", (7,), 0.01), ("small", (2,), 1.0), ("zeros", (3,), 0.0))
_NORM_STEPS = 3
_NORM_HPARAMS = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1)
_SENDING = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
            "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather", "scatter", "send",
            "recv", "isend", "irecv", "all_to_all", "all_to_all_single")


def norm_cases() -> list:
    """The whole tensors of the check (float64), in order; the gradients of step t are sin(t·θ₀ + k)."""
    g = torch.Generator().manual_seed(404)
    return [torch.randn(shape, generator=g, dtype=torch.float64) * scale for _, shape, scale in _NORM_TENSORS]


def _slices(tensors: list, rank: int, world_size: int) -> list:
    from labkit.ring import chunk_bounds
    return [t.reshape(-1)[slice(*chunk_bounds(t.numel(), world_size)[rank])].clone() for t in tensors]


def norms_formula(slices_per_rank: list, rank: int, *, combine: str = "sum", root: str = "after",
                  local: bool = False) -> list:
    """labkit.optim.whole_norms's result on ``rank`` computed in this process from every rank's slices, and its
    known-wrong variants: ``local`` (this rank's slices only), ``combine`` "sum" | "mean" | "max" (how the ranks'
    values are joined), ``root`` "after" (√ of the joined squares) | "before" (the slices' norms joined) | "none"."""
    squares = [[float(s.double().pow(2).sum()) for s in mine] for mine in slices_per_rank]
    if local:
        squares = [squares[rank]]
    out = []
    for k in range(len(squares[0])):
        values = [sq[k] ** 0.5 if root == "before" else sq[k] for sq in squares]
        joined = {"sum": sum(values), "mean": sum(values) / len(values), "max": max(values)}[combine]
        out.append(joined ** 0.5 if root == "after" else joined)
    return out


NORM_MISTAKES = (
    Mistake("each rank's own slices", dict(local=True),
     "each rank returned the norms of its own slices: a rank holds only part of each tensor, and the trust ratio "
     "needs the whole tensor's norm, so the ranks must combine what they hold (and then every rank has the same "
     "numbers)."),
    Mistake("sum of the slices' norms", dict(root="before"),
     "the slices' norms were added: norms do not add (‖(3, 4)‖ = 5, not 3 + 4). What adds over the slices is the "
     "squared norm: ‖θ‖² = Σ_r ‖θ_r‖²."),
    Mistake("no square root", dict(root="none"),
     "these are the squared norms Σ_r ‖θ_r‖²: take the square root of the sum."),
    Mistake("mean of the squares", dict(combine="mean"),
     "the squared norms were averaged over the ranks (an all-reduce followed by a division by N, as for "
     "gradients): the whole tensor's squared norm is their sum, not their mean."),
    Mistake("mean of the slices' norms", dict(combine="mean", root="before"),
     "the slices' norms were averaged over the ranks: neither norms nor their mean give the whole norm; the "
     "squared norms add: ‖θ‖² = Σ_r ‖θ_r‖²."),
    Mistake("largest slice norm", dict(combine="max", root="before"),
     "the largest of the slices' norms was taken (an all-reduce with MAX): the whole tensor's squared norm is the "
     "sum of the slices' squared norms."),
)


class _Sent:
    """Counts the messages and the numbers this rank hands to torch.distributed while the student's function runs."""

    def __init__(self):
        self.calls: list = []

    def __enter__(self):
        self._saved = {n: getattr(dist, n) for n in _SENDING if hasattr(dist, n)}
        for n, fn in self._saved.items():
            setattr(dist, n, self._counting(n, fn))
        return self

    def _counting(self, name, fn):
        def counted(*args, **kwargs):
            tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
            numel = tensors[-1].numel() if tensors else 0            # the input is the last tensor argument
            if name in ("all_reduce", "broadcast", "reduce", "send", "isend") and tensors:
                numel = tensors[0].numel()
            self.calls.append((name, numel))
            return fn(*args, **kwargs)
        return counted

    def __exit__(self, *exc):
        for n, fn in self._saved.items():
            setattr(dist, n, fn)


def _norms_worker(student_fn, name: str, seconds: float) -> dict:
    from labkit.optim import sharded_lamb_step, whole_norms

    rank, N = dist.get_rank(), dist.get_world_size()
    whole = norm_cases()
    mine = _slices(whole, rank, N)
    given = [s.clone() for s in mine]
    with time_limit(seconds, f"{name} did not return within {seconds:g} s on rank {rank} ({N} processes): an "
                             f"endless loop, or a collective that the other ranks do not call?"), _Sent() as sent:
        returned = call_student(student_fn, given, name=name, task="4c")
    record = dict(returned=describe(returned), values=_numbers(returned, len(mine)), calls=sent.calls,
                  changed=[k for k, (a, b) in enumerate(zip(mine, given)) if not torch.equal(a, b)],
                  slices=mine, reference=whole_norms(mine))
    if record["values"] is None or record["changed"] or not all(
            close_number(w, g) for w, g in zip(record["reference"], record["values"])):
        return record
    # the same function in 3 steps of sharded LAMB, next to nothing else: the parent compares with Lamb
    params = [s.clone() for s in mine]
    ms, vs = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    for step in range(1, _NORM_STEPS + 1):
        grads = _slices([torch.sin(t * step + k) for k, t in enumerate(whole)], rank, N)
        with time_limit(seconds, f"{name} did not return within {seconds:g} s on rank {rank} in sharded LAMB's step "
                                 f"{step} (called with {2 * len(params)} tensors)"):
            sharded_lamb_step(params, grads, ms, vs, step, norms=lambda ts: _student_norms(student_fn, ts, name),
                              **_NORM_HPARAMS)
    record["stepped"] = params
    return record


def _student_norms(student_fn, tensors: list, name: str) -> list:
    returned = call_student(student_fn, tensors, name=name, task="4c")
    values = _numbers(returned, len(tensors))
    if values is None:
        raise CheckFailed(f"{name}, called by sharded LAMB with {len(tensors)} slices (the parameters' and the "
                          f"updates'), returned {describe(returned)}: one number per tensor given. Does your function "
                          f"assume a number of tensors?")
    return values


def _numbers(x, n: int):
    """The returned norms as floats, or None when they are not n numbers."""
    if isinstance(x, torch.Tensor):
        x = x.detach().reshape(-1).tolist()
    if not isinstance(x, (list, tuple)) or len(x) != n:
        return None
    values = [as_number(v) for v in x]
    return None if any(v is None for v in values) else values


def _lamb_on_whole_tensors() -> list:
    from labkit.optim import Lamb

    whole = norm_cases()
    params = [torch.nn.Parameter(t.clone()) for t in whole]
    opt = Lamb(params, foreach=False, **_NORM_HPARAMS)
    for step in range(1, _NORM_STEPS + 1):
        for k, (p, t) in enumerate(zip(params, whole)):
            p.grad = torch.sin(t * step + k)
        opt.step()
    return [p.detach().reshape(-1) for p in params]


def _diagnose_norms(name: str, N: int, records: list) -> str | None:
    names = [n for n, _, _ in _NORM_TENSORS]
    L = len(names)
    head = f"{name} on {N} processes"
    for r, rec in enumerate(records):
        if rec["values"] is None:
            return (f"{head}: rank {r} returned {rec['returned']}; return the norms of the whole tensors, one number "
                    f"per tensor ({L} here: {and_list(names)}), in the order of the slices given, as a list of "
                    f"floats or a tensor of {L} elements.")
        if rec["changed"]:
            which = and_list(names[k] for k in rec["changed"])
            return (f"{head}: on rank {r} your function changed the slices it was given ({which}): they are the "
                    f"parameters, which the optimizer updates next. Compute on copies or with out-of-place "
                    f"operations (s.pow(2), not s.pow_(2)).")
    slices = [rec["slices"] for rec in records]
    for r, rec in enumerate(records):
        for k, (want, got) in enumerate(zip(rec["reference"], rec["values"])):
            if close_number(want, got):
                continue
            e, g = fmt_pair(want, got)
            text = (f"{head}: on rank {r} the norm of {names[k]} (shape {_NORM_TENSORS[k][1]}; this rank's slice: "
                    f"{slices[r][k].numel()} element(s)) is {g}, expected {e}")
            mistake = find_mistake(NORM_MISTAKES, lambda m: all(
                _all_numbers_close(norms_formula(slices, q, **m.variant), records[q]["values"]) for q in range(N)))
            if mistake:
                return f"{text}: {mistake.says}"
            if math.isnan(got):
                return f"{text}. nan: a 0/0 or the square root of a negative number?"
            return (f"{text}. Each rank holds a slice θ_r of every tensor; the whole norm is the same on every rank "
                    f"and does not depend on how the tensor was cut.")
    for r, rec in enumerate(records):
        sending = [c for c in rec["calls"] if c[0] not in ("recv", "irecv")]
        numbers = sum(n for _, n in sending)
        if numbers > L:
            return (f"{head}: the norms are right, but rank {r} sent {numbers} numbers for {L} tensors ("
                    f"{and_list(f'{op}({n})' for op, n in sending)}): the slices themselves? One number per tensor is "
                    f"enough to get each whole norm.")
        if len(sending) > 1:
            ops = ", ".join(f"{op}({n})" for op, n in sending)
            return (f"{head}: the norms are right, but rank {r} sent {len(sending)} messages for {L} tensors ({ops}: "
                    f"the operation and the numbers it sent). Every message costs its latency α however small it is "
                    f"(lesson 2): put every tensor's number in one tensor and combine them in one collective.")
    want = _lamb_on_whole_tensors()
    for k, w in enumerate(want):
        got = torch.cat([rec["stepped"][k] for rec in records])
        if not _close(w, got):
            return (f"{head}: the norms of the check's tensors are right, but 3 steps of labkit.optim.sharded_lamb_step "
                    f"with your function (called with {2 * L} tensors: the parameters' slices and the updates') "
                    f"differ from labkit.optim.Lamb on the whole tensors: " + _element(names[k], w, got)
                    + ". Does your function assume a number of tensors or their sizes?")
    return None


def _all_numbers_close(want: list, got: list) -> bool:
    return len(want) == len(got) and all(close_number(w, g) for w, g in zip(want, got))


def check_whole_norms(whole_norms, *, world_sizes=NORM_WORLD_SIZES, timeout: float = 10.0) -> None:
    """Check exercise 4c: ``whole_norms(shards)``, called on every rank with that rank's slices of some tensors
    (1-D float64 tensors, some empty), returns the norms of the whole tensors, the same on every rank, in one
    message of one number per tensor. Compared with ``labkit.optim.whole_norms`` on 3 and 2 processes; then 3
    steps of ``labkit.optim.sharded_lamb_step`` with it against ``labkit.optim.Lamb`` on the whole tensors."""
    __tracebackhide__ = True
    name = need_function(whole_norms, "check_whole_norms")
    for N in world_sizes:
        records = run_on_ranks(_norms_worker, whole_norms, name, 0.6 * timeout, world_size=N, timeout=timeout,
                               name=name, task="4c")
        problem = _diagnose_norms(name, N, records)
        if problem:
            fail(problem)
    sizes = sorted(world_sizes)
    passed(f"{name} gives the whole tensors' norms on {and_list(sizes)} processes (slices of unequal length, one "
           f"empty, a tensor of zeros), in one message of one number per tensor; 3 steps of sharded LAMB with it "
           f"equal labkit.optim.Lamb on the whole tensors")
