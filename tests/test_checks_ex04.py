"""The checkers of exercise 4 accept the solution notebook's lamb_step and adascale_gain and reject each
known-wrong version with a message that names the mistake: LAMB without bias correction, weight decay outside
the trust ratio, a global trust ratio, the source article's formula, a zero-initialised tensor that never
moves...; the gain computed after averaging, a sum instead of a mean, no n/(n−1)... A wrong lamb_step is
caught in this process; a wrong adascale_gain stops at the first world size (3), in one launch."""

import math
import sys
from pathlib import Path

import pytest
from notebook_code import code_cells, imports_without_pyplot
import torch
import torch.distributed as dist

from labkit.checks import CheckFailed
from labkit.checks import ex04
from labkit.checks.ex04 import (GAIN_MISTAKES, LAMB_MISTAKES, check_adascale_gain, check_lamb, gain_cases,
                                gain_formula, labkit_gain, lamb_variant_step)

ROOT = Path(__file__).resolve().parents[1]


def _solution_functions():
    """lamb_step, adascale_gain and whole_norms exactly as the solution notebook defines them."""
    code = code_cells(ROOT / "solutions" / "04_large_batch_exercise.ipynb")
    namespace = {"__name__": "__main__"}   # as in a notebook: its functions and classes travel by value
    exec(compile(imports_without_pyplot(code[0]), "solution-imports", "exec"), namespace)
    for name in ("def lamb_step", "def adascale_gain", "def whole_norms"):
        exec(compile(next(s for s in code if name in s), name, "exec"), namespace)
    return namespace["lamb_step"], namespace["adascale_gain"], namespace["whole_norms"]


lamb_step, adascale_gain, whole_norms = _solution_functions()


def assert_rejected(check, fn, expected, **kwargs):
    """``check(fn)`` raises CheckFailed, and its message contains every text of ``expected``."""
    with pytest.raises(CheckFailed) as info:
        check(fn, **kwargs)
    for text in expected:
        assert text in str(info.value), str(info.value)
    return str(info.value)


# --------------------------------------------------------------------------------------------
# The solution passes; the checkers' own formulas are labkit's
# --------------------------------------------------------------------------------------------

def test_the_solution_passes_both_checks(capsys):
    check_lamb(lamb_step)
    check_adascale_gain(adascale_gain)
    assert capsys.readouterr().out.split("\n") == [
        "✓ lamb_step matches labkit.optim.Lamb (the paper's Algorithm 2) over 50 steps on 4 tensors (one of norm "
        "above 10, one tiny, one starting at zero), weight decay 0.1: parameters within 1e-12, m, v and the trust "
        "ratios equal; with zero gradients and no weight decay the ratio is 1",
        "✓ adascale_gain matches labkit.optim.AdaScale on 2, 3 and 4 processes (gain with signal and noise: 1.323 on "
        "2, 1.539 on 3, 1.48 on 4; with S = 2N, nearly pure noise (gain S) and zero gradients (gain 1) too), and "
        "leaves every rank's gradients averaged in place",
        ""]


def test_the_lamb_variants_default_is_labkits_lamb_and_every_mistake_differs_from_it():
    params = ex04._initial_params()
    ms, vs = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    opt, mirror = ex04._lamb_reference(params, ex04.WEIGHT_DECAY)
    hp = dict(lr=ex04.LR, betas=ex04.BETAS, eps=ex04.EPS, weight_decay=ex04.WEIGHT_DECAY)
    for step in range(1, 11):
        grads = ex04._gradients(params, step)
        if step == 1:   # every known mistake changes the first step (so it is named at step 1)
            for mistake in LAMB_MISTAKES:
                wrong = lamb_variant_step(params, grads, ms, vs, step, variant=mistake.variant, **hp)
                right = lamb_variant_step(params, grads, ms, vs, step, **hp)
                assert any(not torch.allclose(a, b, rtol=1e-6, atol=0) for a, b in zip(wrong[0] + wrong[1],
                                                                                      right[0] + right[1])), mistake.name
        params, ms, vs, ratios = lamb_variant_step(params, grads, ms, vs, step, **hp)
        for p, g in zip(mirror, grads):
            p.grad = g
        opt.step()
        assert all(torch.equal(a, b.detach()) for a, b in zip(params, mirror))
        assert ratios == [float(opt.state[p]["trust_ratio"]) for p in mirror]


def test_the_gain_formula_is_adascales_and_the_cases_exercise_it():
    for N in (2, 3, 4):
        cases = gain_cases(N)
        for case in cases:
            assert gain_formula(case["grads"], case["scale"]) == pytest.approx(
                labkit_gain(case["grads"], case["scale"]), rel=1e-12)
        signal, doubled, noise, zero = (labkit_gain(c["grads"], c["scale"]) for c in cases)
        assert 1.2 < signal < N - 0.2 and 1.2 < doubled < 2 * N - 0.2   # neither end: no estimate clamped
        assert noise == N and zero == 1.0
        for mistake in GAIN_MISTAKES:   # each mistake changes at least one case
            assert any(not math.isclose(gain_formula(c["grads"], c["scale"], **mistake.variant),
                                        labkit_gain(c["grads"], c["scale"]), rel_tol=1e-6) for c in cases), mistake.name


# --------------------------------------------------------------------------------------------
# 4a: known-wrong lamb_step, as a student might write them
# --------------------------------------------------------------------------------------------

def _lamb(body):
    """A lamb_step whose per-tensor work is ``body(p, g, m, v, step, beta1, beta2, eps, wd) -> (u, ratio)``;
    it then applies p -= lr * ratio * u and returns the ratios."""
    @torch.no_grad()
    def lamb_step(params, grads, exp_avgs, exp_avg_sqs, step, *, lr, betas, eps, weight_decay):
        ratios = []
        for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
            u, ratio = body(p, g, m, v, step, *betas, eps, weight_decay)
            p.sub_(lr * ratio * u)
            ratios.append(ratio)
        return ratios
    return lamb_step


def _moments(g, m, v, beta1, beta2):
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)


def _ratio(p, u):
    w, n = p.norm().item(), u.norm().item()
    return w / n if w > 0 and n > 0 else 1.0


@_lamb
def no_bias_correction(p, g, m, v, step, beta1, beta2, eps, wd):
    _moments(g, m, v, beta1, beta2)
    u = m / (v.sqrt() + eps) + wd * p
    return u, _ratio(p, u)


@_lamb
def corrected_in_place(p, g, m, v, step, beta1, beta2, eps, wd):
    _moments(g, m, v, beta1, beta2)
    m.div_(1 - beta1 ** step)
    v.div_(1 - beta2 ** step)
    u = m / (v.sqrt() + eps) + wd * p
    return u, _ratio(p, u)


@_lamb
def swapped_betas(p, g, m, v, step, beta1, beta2, eps, wd):
    _moments(g, m, v, beta2, beta1)
    u = (m / (1 - beta2 ** step)) / ((v / (1 - beta1 ** step)).sqrt() + eps) + wd * p
    return u, _ratio(p, u)


def _r(g, m, v, step, beta1, beta2, eps):
    _moments(g, m, v, beta1, beta2)
    return (m / (1 - beta1 ** step)) / ((v / (1 - beta2 ** step)).sqrt() + eps)


@torch.no_grad()
def decay_after_ratio(params, grads, exp_avgs, exp_avg_sqs, step, *, lr, betas, eps, weight_decay):
    ratios = []
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        r = _r(g, m, v, step, *betas, eps)
        ratio = _ratio(p, r)
        p.sub_(lr * ratio * r)
        p.sub_(lr * weight_decay * p)          # decoupled decay, as AdamW: outside the trust ratio
        ratios.append(ratio)
    return ratios


@_lamb
def ratio_without_decay(p, g, m, v, step, beta1, beta2, eps, wd):
    r = _r(g, m, v, step, beta1, beta2, eps)
    return r + wd * p, _ratio(p, r)


@_lamb
def decay_in_gradient(p, g, m, v, step, beta1, beta2, eps, wd):
    g = g + wd * p                              # Adam's L2
    u = _r(g, m, v, step, beta1, beta2, eps)
    return u, _ratio(p, u)


@_lamb
def decay_in_gradient_in_place(p, g, m, v, step, beta1, beta2, eps, wd):
    g.add_(wd * p)
    u = _r(g, m, v, step, beta1, beta2, eps)
    return u, _ratio(p, u)


@torch.no_grad()
def global_ratio(params, grads, exp_avgs, exp_avg_sqs, step, *, lr, betas, eps, weight_decay):
    updates = [_r(g, m, v, step, *betas, eps) + weight_decay * p
               for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs)]
    w = torch.cat([p.flatten() for p in params]).norm().item()
    n = torch.cat([u.flatten() for u in updates]).norm().item()
    ratio = w / n if w > 0 and n > 0 else 1.0
    for p, u in zip(params, updates):
        p.sub_(lr * ratio * u)
    return [ratio] * len(params)


def source_formula(b):
    """The source article's θ ← θ − η·(λθ + r)/(‖r‖/b + λ), with b a constant."""
    @_lamb
    def lamb_step(p, g, m, v, step, beta1, beta2, eps, wd):
        r = _r(g, m, v, step, beta1, beta2, eps)
        return r + wd * p, 1.0 / (r.norm().item() / b + wd)
    return lamb_step


@_lamb
def source_formula_layerwise(p, g, m, v, step, beta1, beta2, eps, wd):
    """The same with b = ‖θ‖, the layer-wise factor, written as a student reading the source would."""
    r = _r(g, m, v, step, beta1, beta2, eps)
    b = p.norm().item()
    return r + wd * p, 1.0 / (r.norm().item() / b + wd) if b > 0 else 1.0


@_lamb
def no_eps(p, g, m, v, step, beta1, beta2, eps, wd):
    _moments(g, m, v, beta1, beta2)
    u = (m / (1 - beta1 ** step)) / (v / (1 - beta2 ** step)).sqrt() + wd * p
    return u, _ratio(p, u)


@_lamb
def eps_inside_sqrt(p, g, m, v, step, beta1, beta2, eps, wd):
    _moments(g, m, v, beta1, beta2)
    u = (m / (1 - beta1 ** step)) / (v / (1 - beta2 ** step) + eps).sqrt() + wd * p
    return u, _ratio(p, u)


@_lamb
def clamp_at_10(p, g, m, v, step, beta1, beta2, eps, wd):
    u = _r(g, m, v, step, beta1, beta2, eps) + wd * p
    w, n = min(p.norm().item(), 10.0), u.norm().item()
    return u, (w / n if w > 0 and n > 0 else 1.0)


@_lamb
def no_trust_ratio(p, g, m, v, step, beta1, beta2, eps, wd):
    return _r(g, m, v, step, beta1, beta2, eps) + wd * p, 1.0


@_lamb
def inverted_ratio(p, g, m, v, step, beta1, beta2, eps, wd):
    u = _r(g, m, v, step, beta1, beta2, eps) + wd * p
    w, n = p.norm().item(), u.norm().item()
    return u, (n / w if w > 0 and n > 0 else 1.0)


@_lamb
def ratio_zero_at_zero_weights(p, g, m, v, step, beta1, beta2, eps, wd):
    u = _r(g, m, v, step, beta1, beta2, eps) + wd * p
    return u, p.norm().item() / u.norm().item()          # 0 when p is all zeros: it never moves


@_lamb
def nan_when_update_is_zero(p, g, m, v, step, beta1, beta2, eps, wd):
    u = _r(g, m, v, step, beta1, beta2, eps) + wd * p
    w, n = p.norm(), u.norm()
    return u, (w / n if w > 0 else 1.0)                  # ‖u‖ = 0 with ‖θ‖ > 0: inf, then 0·inf = nan


@_lamb
def float32_ratio(p, g, m, v, step, beta1, beta2, eps, wd):
    u = _r(g, m, v, step, beta1, beta2, eps) + wd * p
    return u, torch.tensor(_ratio(p, u))                 # a float32 scalar: lr * ratio rounded to float32


@_lamb
def moments_not_in_place(p, g, m, v, step, beta1, beta2, eps, wd):
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    u = (m / (1 - beta1 ** step)) / ((v / (1 - beta2 ** step)).sqrt() + eps) + wd * p
    return u, _ratio(p, u)


@torch.no_grad()
def moments_replaced_in_the_list(params, grads, exp_avgs, exp_avg_sqs, step, *, lr, betas, eps, weight_decay):
    beta1, beta2 = betas
    ratios = []
    for i, (p, g) in enumerate(zip(params, grads)):
        exp_avgs[i] = beta1 * exp_avgs[i] + (1 - beta1) * g          # a new tensor in the list: the optimizer's
        exp_avg_sqs[i] = beta2 * exp_avg_sqs[i] + (1 - beta2) * g * g  # state keeps the old one
        u = (exp_avgs[i] / (1 - beta1 ** step)) / ((exp_avg_sqs[i] / (1 - beta2 ** step)).sqrt() + eps)
        u = u + weight_decay * p
        ratio = _ratio(p, u)
        p.sub_(lr * ratio * u)
        ratios.append(ratio)
    return ratios


@torch.no_grad()
def params_not_in_place(params, grads, exp_avgs, exp_avg_sqs, step, *, lr, betas, eps, weight_decay):
    ratios = []
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        u = _r(g, m, v, step, *betas, eps) + weight_decay * p
        ratio = _ratio(p, u)
        p = p - lr * ratio * u                              # a new tensor: params[i] does not change
        ratios.append(ratio)
    return ratios


@_lamb
def wrong_ratio_returned(p, g, m, v, step, beta1, beta2, eps, wd):
    u = _r(g, m, v, step, beta1, beta2, eps) + wd * p
    p.sub_(0.05 * _ratio(p, u) * u)                          # applies the right step (lr = 0.05 in the check)...
    return u * 0, p.norm().item()                           # ...but returns ‖θ‖ as "the ratio"


LAMB_CASES = [
    pytest.param(no_bias_correction, ["lamb_step is wrong at step 1", "LAMB without bias correction",
                                      "divide m by (1−β1ᵗ) and v by (1−β2ᵗ)"], id="no_bias_correction"),
    pytest.param(corrected_in_place, ["at step 1", "written into exp_avgs and exp_avg_sqs", "new tensors"],
                 id="corrected_in_place"),
    pytest.param(swapped_betas, ["β1 and β2 are swapped"], id="swapped_betas"),
    pytest.param(decay_after_ratio, ["at step 1", "weight decay was added after the trust ratio", "u = r + λθ"],
                 id="decay_after_ratio"),
    pytest.param(ratio_without_decay, ["the trust ratio was computed from ‖r‖, without the weight decay"],
                 id="ratio_without_decay"),
    pytest.param(decay_in_gradient, ["weight decay was added to the gradient", "Adam's L2"], id="decay_in_gradient"),
    pytest.param(decay_in_gradient_in_place, ["it changed grads[0]", "in place"], id="decay_in_gradient_in_place"),
    pytest.param(global_ratio, ["at step 1", "one norm over all tensors (a global trust ratio", "one per tensor"],
                 id="global_ratio"),
    pytest.param(source_formula(1), ["at step 1", "the source article's formula", "read with b a constant (b = 1)",
                                     "the trust ratio is gone", "θ ← θ − η·‖θ‖/‖u‖·u"], id="source_formula_b1"),
    pytest.param(source_formula(16), ["the source article's formula", "(b = 16)"], id="source_formula_b16"),
    pytest.param(source_formula_layerwise, ["at step 1", "the source article's formula", "with b = ‖θ‖",
                                            "an upper bound of ‖u‖"], id="source_formula_layerwise"),
    pytest.param(no_eps, ["ε is missing"], id="no_eps"),
    pytest.param(eps_inside_sqrt, ["ε is inside the square root"], id="eps_inside_sqrt"),
    pytest.param(clamp_at_10, ["clamped ‖θ‖ at 10"], id="clamp_at_10"),
    pytest.param(no_trust_ratio, ["there is no trust ratio", "Adam with weight decay"], id="no_trust_ratio"),
    pytest.param(inverted_ratio, ["the trust ratio is upside down"], id="inverted_ratio"),
    pytest.param(ratio_zero_at_zero_weights, ["at step 1", "the trust ratio of 'out.bias' is 0", "never move",
                                              "ratio as 1 when either norm is 0"], id="ratio_zero_at_zero_weights"),
    pytest.param(nan_when_update_is_zero, ["at step 1 of the run without weight decay", "'hidden.bias'", "inf",
                                           "‖u‖ = 0 (zero gradient and no weight decay", "ratio as 1"],
                 id="nan_when_update_is_zero"),
    pytest.param(float32_ratio, ["at step 1", "about the precision of float32", "torch.tensor(1.0) is float32"],
                 id="float32_ratio"),
    pytest.param(moments_not_in_place, ["at step 1", "exp_avgs[0] (m of 'hidden.weight')", "It was not updated",
                                        "in place"], id="moments_not_in_place"),
    pytest.param(moments_replaced_in_the_list, ["at step 1", "m of 'hidden.weight'", "It was not updated"],
                 id="moments_replaced_in_the_list"),
    pytest.param(params_not_in_place, ["at step 1", "'hidden.weight' did not change",
                                       "p = p - ... makes a new tensor"], id="params_not_in_place"),
    pytest.param(wrong_ratio_returned, ["the parameters, m and v are right",
                                        "trust ratio you returned for 'hidden.weight'"], id="wrong_ratio_returned"),
]


@pytest.mark.parametrize("fn,expected", LAMB_CASES)
def test_known_wrong_lamb_steps_are_named(fn, expected):
    assert_rejected(check_lamb, fn, expected)


def _lamb_made_wrong(mistake):
    """A lamb_step that is labkit's step changed as the table's row says (checker and tests share the table)."""
    @torch.no_grad()
    def lamb_step(params, grads, exp_avgs, exp_avg_sqs, step, *, lr, betas, eps, weight_decay):
        new_p, new_m, new_v, ratios = lamb_variant_step(params, grads, exp_avgs, exp_avg_sqs, step, lr=lr,
                                                        betas=betas, eps=eps, weight_decay=weight_decay,
                                                        variant=mistake.variant)
        for olds, news in ((params, new_p), (exp_avgs, new_m), (exp_avg_sqs, new_v)):
            for old, new in zip(olds, news):
                old.copy_(new)
        return ratios
    return lamb_step


@pytest.mark.parametrize("mistake", LAMB_MISTAKES, ids=lambda m: m.name)
def test_every_lamb_mistake_of_the_table_is_named_with_its_own_message(mistake):
    assert_rejected(check_lamb, _lamb_made_wrong(mistake), ["lamb_step is wrong at step 1", mistake.says])


def test_lamb_step_return_values_and_errors_are_explained():
    def returns_none(params, grads, exp_avgs, exp_avg_sqs, step, **hp):
        lamb_step(params, grads, exp_avgs, exp_avg_sqs, step, **hp)

    def returns_one_number(params, grads, exp_avgs, exp_avg_sqs, step, **hp):
        return lamb_step(params, grads, exp_avgs, exp_avg_sqs, step, **hp)[0]

    def returns_too_few(params, grads, exp_avgs, exp_avg_sqs, step, **hp):
        return lamb_step(params, grads, exp_avgs, exp_avg_sqs, step, **hp)[:2]

    def raises(params, grads, exp_avgs, exp_avg_sqs, step, **hp):
        raise ValueError("oops")

    assert_rejected(check_lamb, returns_none, ["returned None at step 1", "list of trust ratios"])
    assert_rejected(check_lamb, returns_one_number, ["returned a float", "one number per tensor (4 here)"])
    assert_rejected(check_lamb, returns_too_few, ["returned 2 trust ratios at step 1 for 4 tensors"])
    with pytest.raises(CheckFailed, match="raises raised ValueError at step 1: oops") as info:
        check_lamb(raises)
    assert isinstance(info.value.__cause__, ValueError)     # the student's traceback is chained


def test_lamb_stub_and_a_students_own_not_implemented():
    def stub(params, grads, exp_avgs, exp_avg_sqs, step, **hp):
        raise NotImplementedError("Exercise 4a: update m and v in place; see the instructions above")

    def todo(params, grads, exp_avgs, exp_avg_sqs, step, **hp):
        raise NotImplementedError

    with pytest.raises(NotImplementedError, match=r"^Exercise 4a: update m and v in place"):
        check_lamb(stub)
    with pytest.raises(NotImplementedError, match=r"^Exercise 4a: todo is not written yet"):
        check_lamb(todo)


# --------------------------------------------------------------------------------------------
# 4b: known-wrong adascale_gain, as a student might write them
# --------------------------------------------------------------------------------------------

def _estimate(local_mean, mean_sq, n, S, *, bessel=True, correct=True, clamp=True, rescale=True):
    noise = (n / (n - 1) if bessel else 1.0) * (local_mean - mean_sq)
    var = noise * S / n if rescale else noise
    sqr = mean_sq - var / S if correct else mean_sq
    if clamp:
        var, sqr = max(var, 0.0), max(sqr, 0.0)
    if var + sqr == 0:
        return 1.0
    return (var + sqr) / (var / S + sqr)


def _sq(tensors):
    return sum(g.pow(2).sum() for g in tensors)


def _average(grads, n):
    for g in grads:
        dist.all_reduce(g)
        g.div_(n)


def gain_after_averaging(grads, scale):
    n = dist.get_world_size()
    _average(grads, n)
    local = torch.as_tensor(_sq(grads), dtype=torch.float64)   # too late: every rank holds ḡ now
    dist.all_reduce(local)
    return _estimate(local.item() / n, _sq(grads).item(), n, scale)


def _gain(**mistakes):
    """The solution's steps with one of _estimate's mistakes."""
    def adascale_gain(grads, scale):
        n = dist.get_world_size()
        flags = dict(mistakes)
        local = torch.as_tensor(_sq(grads), dtype=torch.float64)
        dist.all_reduce(local)
        _average(grads, n)
        local_mean = local.item() if flags.pop("sum_not_mean", False) else local.item() / n
        S = n if flags.pop("ignore_scale", False) else scale
        return _estimate(local_mean, _sq(grads).item(), n, S, **flags)
    return adascale_gain


def gain_with_summed_gradients(grads, scale):
    n = dist.get_world_size()
    local = torch.as_tensor(_sq(grads), dtype=torch.float64)
    dist.all_reduce(local)
    for g in grads:
        dist.all_reduce(g)                                      # the sum: not divided by n
    return _estimate(local.item() / n, _sq(grads).item() / n ** 2, n, scale)


def gain_with_own_norm(grads, scale):
    n = dist.get_world_size()
    local = _sq(grads).item()                                   # this rank's ‖gᵢ‖² only: no all-reduce
    _average(grads, n)
    return _estimate(local, _sq(grads).item(), n, scale)


def gain_without_averaging_in_place(grads, scale):
    n = dist.get_world_size()
    local = torch.as_tensor(_sq(grads), dtype=torch.float64)
    dist.all_reduce(local)
    mean = [g.clone() for g in grads]
    _average(mean, n)                                           # averages copies: grads keep the local ones
    return _estimate(local.item() / n, _sq(mean).item(), n, scale)


def gain_replacing_the_tensors(grads, scale):
    n = dist.get_world_size()
    local = torch.as_tensor(_sq(grads), dtype=torch.float64)
    dist.all_reduce(local)
    for i, g in enumerate(grads):
        total = g.clone()
        dist.all_reduce(total)
        grads[i] = total / n                                    # a new tensor in the list: .grad unchanged
    return _estimate(local.item() / n, _sq(grads).item(), n, scale)


def gain_zero_division(grads, scale):
    n = dist.get_world_size()
    local = torch.as_tensor(_sq(grads), dtype=torch.float64)
    dist.all_reduce(local)
    _average(grads, n)
    mean_sq = _sq(grads).item()
    var = max(n / (n - 1) * (local.item() / n - mean_sq), 0.0)
    sqr = max(mean_sq - var / scale, 0.0)
    return (var + sqr) / (var / scale + sqr)                     # 0/0 when every gradient is zero


def gain_nan(grads, scale):
    n = dist.get_world_size()
    local = torch.as_tensor(_sq(grads), dtype=torch.float64)
    dist.all_reduce(local)
    _average(grads, n)
    mean_sq = _sq(grads)
    var = (n / (n - 1) * (local / n - mean_sq) * scale / n).clamp(min=0)
    sqr = (mean_sq - var / scale).clamp(min=0)
    return (var + sqr) / (var / scale + sqr)                     # a tensor: nan when every gradient is zero


def gain_inverted(grads, scale):
    return 1 / _gain()(grads, scale)


def gain_returns_nothing(grads, scale):
    _gain()(grads, scale)


_NOTE = sys.version_info >= (3, 11)   # the note added to the student's exception (Python >= 3.11)

GAIN_CASES = [
    pytest.param(gain_after_averaging, ["on 3 processes (case: signal and noise", "the gain is 1, expected 1.5394",
                                        "the gain was computed from the averaged gradient",
                                        "the local norms must be taken before the all-reduce"],
                 id="gain_after_averaging"),
    pytest.param(gain_with_summed_gradients, ["rank 0, grads[0]", "the sum over the 3 ranks, not the mean",
                                              "divide by n = 3"], id="gain_with_summed_gradients"),
    pytest.param(_gain(sum_not_mean=True), ["Σᵢ‖gᵢ‖²", "was used as their mean: divide it by n"],
                 id="sum_of_squared_norms_not_divided"),
    pytest.param(_gain(bessel=False), ["lacks the factor n/(n−1)"], id="no_bessel_factor"),
    pytest.param(_gain(correct=False), ["μ² was taken as ‖ḡ‖²"], id="signal_not_corrected"),
    pytest.param(_gain(ignore_scale=True), ["case: the same gradients with S = 2N = 6", "the scale S was ignored"],
                 id="scale_ignored"),
    pytest.param(_gain(rescale=False), ["S = 2N = 6", "σ²_n, the noise of one rank's gradient, was used as σ²"],
                 id="noise_not_rescaled"),
    pytest.param(_gain(clamp=False), ["case: mostly noise", "not clamped at 0"], id="no_clamp"),
    pytest.param(gain_with_own_norm, ["the gain differs between the ranks (rank 0:", "its own ‖gᵢ‖²"],
                 id="gain_with_own_norm"),
    pytest.param(gain_without_averaging_in_place, ["it is still rank 0's own gradient", "in place"],
                 id="gain_without_averaging_in_place"),
    pytest.param(gain_replacing_the_tensors, ["grads[0] was replaced by a new tensor", "Average in place"],
                 id="gain_replacing_the_tensors"),
    pytest.param(gain_zero_division, ["raised ZeroDivisionError on rank", "--- traceback of rank",
                                      "return (var + sqr) / (var / scale + sqr)"]
                 + (["(in the case: every gradient zero", "the gain is 1 when σ² + μ² = 0"] if _NOTE else []),
                 id="gain_zero_division"),
    pytest.param(gain_nan, ["case: every gradient zero", "the gain is nan, expected 1", "0/0?"], id="gain_nan"),
    pytest.param(gain_inverted, ["the ratio is upside down"], id="gain_inverted"),
    pytest.param(gain_returns_nothing, ["gain_returns_nothing returned None on rank 0", "return the gain"],
                 id="gain_returns_nothing"),
]


@pytest.mark.parametrize("fn,expected", GAIN_CASES)
def test_known_wrong_gains_are_named(fn, expected):
    assert_rejected(check_adascale_gain, fn, expected)


def _gain_made_wrong(flags):
    """An adascale_gain that gathers every rank's gradients and applies the table row's wrong formula."""
    def adascale_gain(grads, scale):
        n = dist.get_world_size()
        everyone = [[torch.empty_like(g) for _ in range(n)] for g in grads]
        for g, out in zip(grads, everyone):
            dist.all_gather(out, g)
        gain = gain_formula([[out[r] for out in everyone] for r in range(n)], scale, **flags)
        _average(grads, n)
        return gain
    return adascale_gain


@pytest.mark.parametrize("mistake", GAIN_MISTAKES, ids=lambda m: m.name)
def test_every_gain_mistake_of_the_table_is_named_with_its_own_message(mistake):
    assert_rejected(check_adascale_gain, _gain_made_wrong(mistake.variant), [mistake.says], world_sizes=(3,))


def test_gain_stub_is_reported_as_not_done():
    def adascale_gain(grads, scale):
        raise NotImplementedError("Exercise 4b: take the local squared norm; see the instructions above")

    with pytest.raises(NotImplementedError, match=r"^Exercise 4b: take the local squared norm"):
        check_adascale_gain(adascale_gain)



# --------------------------------------------------------------------------------------------
# 4c. The whole tensors' norms from each rank's slices (sharded LAMB)
# --------------------------------------------------------------------------------------------

from labkit.checks.ex04 import NORM_MISTAKES, check_whole_norms, norms_formula  # noqa: E402


def test_the_solution_and_labkits_whole_norms_pass(capsys):
    from labkit.optim import whole_norms as labkits

    check_whole_norms(whole_norms)
    check_whole_norms(labkits)
    out = capsys.readouterr().out
    assert out.count("✓") == 2 and "in one message of one number per tensor" in out


def test_the_norms_formula_is_labkits_and_every_mistake_changes_it():
    def worker():
        from labkit.optim import whole_norms as labkits
        from labkit.checks.ex04 import _slices, norm_cases
        mine = _slices(norm_cases(), dist.get_rank(), dist.get_world_size())
        return mine, labkits(mine)

    import labkit
    results = labkit.launch(worker, world_size=3)
    slices = [r[0] for r in results]
    assert any(s.numel() == 0 for s in slices[2]), "the check must include an empty slice"
    for rank, (_, reference) in enumerate(results):
        assert norms_formula(slices, rank) == pytest.approx(reference, rel=1e-12)
        for mistake in NORM_MISTAKES:
            assert norms_formula(slices, rank, **mistake.variant) != pytest.approx(reference, rel=1e-6), mistake.name


def _norms_made_wrong(variant):
    """A whole_norms that gathers every rank's slices and applies the table row's wrong formula."""
    def whole_norms(shards):
        n = dist.get_world_size()
        sizes = [torch.zeros(len(shards), dtype=torch.long) for _ in range(n)]
        dist.all_gather(sizes, torch.tensor([s.numel() for s in shards]))
        everyone = []
        for k, s in enumerate(shards):          # gloo gathers equal sizes: pad with zeros (they add nothing)
            longest = max(int(sz[k]) for sz in sizes)
            out = [torch.zeros(longest, dtype=s.dtype) for _ in range(n)]
            dist.all_gather(out, torch.cat([s, s.new_zeros(longest - s.numel())]))
            everyone.append(out)
        per_rank = [[everyone[k][r] for k in range(len(shards))] for r in range(n)]
        return norms_formula(per_rank, dist.get_rank(), **variant)
    return whole_norms


@pytest.mark.parametrize("mistake", NORM_MISTAKES, ids=lambda m: m.name)
def test_every_norms_mistake_of_the_table_is_named_with_its_own_message(mistake):
    assert_rejected(check_whole_norms, _norms_made_wrong(mistake.variant), [mistake.says], world_sizes=(3,))


def norms_local(shards):
    return [s.norm().item() for s in shards]


def norms_added(shards):
    norms = torch.stack([s.double().norm() for s in shards])
    dist.all_reduce(norms)
    return norms.tolist()


def norms_one_message_per_tensor(shards):
    out = []
    for s in shards:
        square = s.double().pow(2).sum()
        dist.all_reduce(square)
        out.append(square.sqrt().item())
    return out


def norms_rebuilding_the_tensors(shards):
    # each rank writes its slices into zeros of the whole sizes, and one all-reduce rebuilds every tensor
    n, rank = dist.get_world_size(), dist.get_rank()
    sizes = torch.tensor([s.numel() for s in shards])
    everyone = [torch.zeros_like(sizes) for _ in range(n)]
    dist.all_gather(everyone, sizes)
    whole = [torch.zeros(int(sum(e[k] for e in everyone)), dtype=torch.float64) for k in range(len(shards))]
    for k, s in enumerate(shards):
        start = int(sum(everyone[r][k] for r in range(rank)))
        whole[k][start:start + s.numel()] = s
    flat = torch.cat(whole)
    dist.all_reduce(flat)
    return [t.norm().item() for t in torch.split(flat, [w.numel() for w in whole])]


def norms_in_place(shards):
    squares = torch.stack([s.pow_(2).sum() for s in shards])
    dist.all_reduce(squares)
    return squares.sqrt().tolist()


def norms_for_four_tensors(shards):
    squares = torch.stack([shards[k].double().pow(2).sum() for k in range(4)])
    dist.all_reduce(squares)
    return squares.sqrt().tolist()


def norms_of_everything(shards):
    square = sum(s.double().pow(2).sum() for s in shards)
    dist.all_reduce(square)
    return square.sqrt()


def norms_only_rank0_sends(shards):
    squares = torch.stack([s.double().pow(2).sum() for s in shards])
    if dist.get_rank() == 0:
        dist.all_reduce(squares)
    return squares.sqrt().tolist()


NORM_CASES = [
    pytest.param(norms_local, ["on rank 0 the norm of weight", "expected", "each rank returned the norms of its own"],
                 id="local"),
    pytest.param(norms_added, ["norms do not add", "‖θ‖² = Σ_r ‖θ_r‖²"], id="norms_added"),
    pytest.param(norms_one_message_per_tensor, ["the norms are right, but rank 0 sent 4 messages for 4 tensors",
                                                "all_reduce(1)", "latency α"], id="one_message_per_tensor"),
    pytest.param(norms_rebuilding_the_tensors, ["the norms are right, but rank 0 sent", "the slices themselves?"],
                 id="rebuilding_the_tensors"),
    pytest.param(norms_in_place, ["your function changed the slices it was given", "s.pow_(2)"], id="in_place"),
    pytest.param(norms_for_four_tensors, ["called by sharded LAMB with 8 slices", "returned a list of 4 items",
                                          "assume a number of tensors"], id="four_tensors"),
    pytest.param(norms_of_everything, ["rank 0 returned", "one number per tensor (4 here"], id="one_number"),
    pytest.param(norms_only_rank0_sends, ["did not finish on 3 processes"], id="only_rank0_sends"),
]


@pytest.mark.parametrize("fn,expected", NORM_CASES)
def test_known_wrong_whole_norms_are_named(fn, expected):
    assert_rejected(check_whole_norms, fn, expected, world_sizes=(3,), timeout=6.0)


def test_norms_stub_is_reported_as_not_done():
    def whole_norms(shards):
        raise NotImplementedError("Exercise 4c: the whole tensors' norms; see the instructions above")

    with pytest.raises(NotImplementedError, match=r"^Exercise 4c: the whole tensors' norms"):
        check_whole_norms(whole_norms)
