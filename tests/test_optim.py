"""labkit.optim against independent implementations (timm, torch_optimizer, fairscale, torch.optim)
and against the formulas, in float64."""

import contextlib

import pytest
import torch
import torch.distributed as dist
from torch import nn

import labkit
from labkit.ddp import BucketedDDP
from labkit.optim import LARS, AdaScale, Lamb, lamb_param_groups, linear_scaling_warmup, scaled_lr, warmup_factor
from labkit.optim.references import fairscale_adascale, timm_lamb, torch_optimizer_lamb

STEPS = 150


class Net(nn.Module):
    """Weights of very different norms (one above torch_optimizer's clamp of 10), a LayerNorm, and
    a bias that starts at exactly zero (its trust ratio must be 1 on the first step)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 3)
        with torch.no_grad():
            self.inp.weight.mul_(12.0)     # ‖W‖ ≈ 15
            self.out.bias.zero_()

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.inp(x))))


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 5, generator=g, dtype=torch.float64)
    y = torch.randn(64, 3, generator=g, dtype=torch.float64)
    return x, y


def _train(make_optimizer, steps=STEPS):
    """Parameters after ``steps`` steps on mini-batches of 8, and the model."""
    torch.manual_seed(0)
    model = Net().double()
    optimizer = make_optimizer(model)
    x, y = _data()
    for i in range(steps):
        batch = slice(8 * (i % 8), 8 * (i % 8 + 1))
        optimizer.zero_grad()
        ((model(x[batch]) - y[batch]) ** 2).mean().backward()
        optimizer.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()]), model


def _assert_same(a, b, tol=1e-12):
    assert a.shape == b.shape
    moved = (a - _train(lambda m: torch.optim.SGD(m.parameters(), lr=0.0), steps=0)[0]).abs().max()
    assert moved > 1e-2, "the parameters did not move: the comparison would prove nothing"
    assert (a - b).abs().max() <= tol * max(1.0, b.abs().max()), (a - b).abs().max()


# --- LAMB ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "readable"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_lamb_equals_timm_lamb_the_papers_algorithm(foreach, weight_decay):
    Timm = timm_lamb()
    ours, _ = _train(lambda m: Lamb(m.parameters(), lr=0.01, weight_decay=weight_decay, foreach=foreach))
    theirs, _ = _train(lambda m: Timm(m.parameters(), lr=0.01, weight_decay=weight_decay,
                                      max_grad_norm=None, always_adapt=True))
    _assert_same(ours, theirs)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "readable"])
def test_lamb_variant_equals_torch_optimizer_lamb(foreach):
    TorchOptimizerLamb = torch_optimizer_lamb()
    ours, model = _train(lambda m: Lamb(m.parameters(), lr=0.01, weight_decay=0.1, bias_correction=False,
                                        max_weight_norm=10.0, foreach=foreach))
    theirs, _ = _train(lambda m: TorchOptimizerLamb(m.parameters(), lr=0.01, weight_decay=0.1, clamp_value=10.0))
    assert model.inp.weight.norm() > 10, "the clamp must be exercised"
    _assert_same(ours, theirs)


def test_lamb_without_the_clamp_differs_from_torch_optimizer():
    # The clamp binds for inp.weight: without it the results must differ (the comparison above can fail).
    ours, _ = _train(lambda m: Lamb(m.parameters(), lr=0.01, weight_decay=0.1, bias_correction=False))
    theirs, _ = _train(lambda m: torch_optimizer_lamb()(m.parameters(), lr=0.01, weight_decay=0.1, clamp_value=10.0))
    assert (ours - theirs).abs().max() > 1e-3


def test_lamb_fast_and_readable_paths_agree():
    fast, _ = _train(lambda m: Lamb(m.parameters(), lr=0.02, weight_decay=0.05, foreach=True))
    readable, _ = _train(lambda m: Lamb(m.parameters(), lr=0.02, weight_decay=0.05, foreach=False))
    _assert_same(fast, readable, tol=1e-13)


def test_lamb_fused_path_equals_the_readable_one_in_float64_and_compiles_once():
    # Two groups (the clamp and no bias correction; no decay and no trust ratio), a bias whose norm
    # starts at 0, and a learning rate that changes every step (a schedule): none of it may change
    # the result, and none of it may compile the step again after the first.
    from torch._dynamo.utils import counters

    def groups(model):
        weights = [p for p in model.parameters() if p.ndim == 2] + [model.out.bias]
        return [dict(params=weights, max_weight_norm=5.0, bias_correction=False),
                dict(params=[model.inp.bias, model.norm.weight, model.norm.bias], weight_decay=0.0, adapt=False)]

    def run(**path):
        torch.manual_seed(0)
        model = Net().double()
        optimizer = Lamb(groups(model), lr=0.02, weight_decay=0.05, **path)
        x, y = _data()
        graphs = []
        for i in range(40):
            for group in optimizer.param_groups:
                group["lr"] = 0.02 * (1 - i / 40)
            optimizer.zero_grad()
            ((model(x[8 * (i % 8):8 * (i % 8 + 1)]) - y[8 * (i % 8):8 * (i % 8 + 1)]) ** 2).mean().backward()
            optimizer.step()
            graphs.append(counters["stats"]["unique_graphs"])
        ratios = [optimizer.state[p]["trust_ratio"] for p in model.parameters()]
        return torch.cat([p.detach().flatten() for p in model.parameters()]), ratios, graphs

    before = counters["stats"]["unique_graphs"]     # shared by the whole process: count what this run adds
    fused, fused_ratios, graphs = run(fused=True)
    readable, readable_ratios, _ = run(foreach=False)
    _assert_same(fused, readable, tol=1e-13)
    assert all(torch.allclose(a, b, rtol=1e-12) for a, b in zip(fused_ratios, readable_ratios))
    assert graphs[0] > before, "nothing was compiled: the fused path ran eagerly"
    assert graphs[-1] == graphs[0], f"the step was compiled again after the first step: {before}, {graphs}"


def test_lamb_fused_falls_back_to_foreach_when_torch_compile_runs_out_of_versions():
    # One compiled version allowed: a second model's shapes cannot compile; that optimizer warns and
    # takes the foreach path, with the same result.
    import torch._dynamo
    torch._dynamo.reset()
    first = [nn.Parameter(torch.randn(5, 3, dtype=torch.float64))]
    first[0].grad = torch.randn(5, 3, dtype=torch.float64)
    torch.manual_seed(0)
    second = [nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in ((7, 2), (4,))]
    grads = [torch.randn_like(p) for p in second]
    expected = [nn.Parameter(p.detach().clone()) for p in second]
    before = [p.detach().clone() for p in second]
    with torch._dynamo.config.patch(recompile_limit=1):
        Lamb(first, lr=0.01, fused=True).step()
        optimizer = Lamb(second, lr=0.01, fused=True)
        for step in range(2):
            for p, g in zip(second, grads):
                p.grad = g
            with pytest.warns(RuntimeWarning, match="recompile_limit") if step == 0 else contextlib.nullcontext():
                optimizer.step()
    torch._dynamo.reset()
    assert not optimizer.fused and optimizer.foreach
    reference = Lamb(expected, lr=0.01, foreach=False)
    for step in range(2):
        for p, g in zip(expected, grads):
            p.grad = g
        reference.step()
    for ours, theirs, start in zip(second, expected, before):
        assert (ours - start).abs().max() > 1e-3, "the parameters did not move"
        assert (ours - theirs).abs().max() <= 1e-13


def test_the_fused_step_is_cut_where_the_model_repeats_itself():
    from labkit.optim.lamb_fused import MIN_UNIT, Repeat, compile_units, longest_repeat
    block = ("ln.w", "ln.b", "qkv.w", "qkv.b", "proj.w", "proj.b", "ln2.w", "ln2.b", "fc.w", "fc.b", "mlp.w", "mlp.b")
    gpt = ("wte", "wpe") + block * 5 + ("ln_f.w", "ln_f.b")
    assert longest_repeat(gpt) == Repeat(start=2, period=12, count=5)
    assert longest_repeat(("a", "b", "c")) is None
    assert longest_repeat(("a",) * 20) == Repeat(0, 1, 20)      # the shortest period among equal coverings
    # a period may start inside what looks like a prefix: "x a b a b a b" repeats (a, b) from 1
    assert longest_repeat(("x", "a", "b", "a", "b", "a", "b")) == Repeat(1, 2, 3)

    def units(shapes):
        return compile_units([torch.empty(s) for s in shapes])

    c = 4
    blocks = [(c,), (c,), (3 * c, c), (3 * c,), (c, c), (c,), (c,), (c,), (4 * c, c), (4 * c,), (c, 4 * c), (c,)]
    shapes = [(50, c), (16, c)] + blocks * 3 + [(c,), (c,)]
    assert units(shapes) == [list(range(2 + 12 * k, 14 + 12 * k)) for k in range(3)] + [[0, 1, 38, 39]]
    # blocks smaller than MIN_UNIT tensors go several to a call; what does not fill one joins the rest
    small = [(c, c), (c,)] * 9
    per_call = MIN_UNIT // 2
    assert units(small) == [list(range(k * MIN_UNIT, (k + 1) * MIN_UNIT)) for k in range(9 // per_call)] + [[16, 17]]
    assert units([(3,), (4,), (5,)]) == [[0, 1, 2]]
    # every tensor in exactly one call, whatever the shapes
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        picks = torch.randint(0, 3, (int(torch.randint(1, 40, (1,), generator=generator)),), generator=generator)
        calls = units([[(2,), (3,), (2, 2)][i] for i in picks.tolist()])
        assert sorted(i for call in calls for i in call) == list(range(len(picks)))


def _stack(depth: int = 8) -> nn.Module:
    """``depth`` equal Linear blocks and a final LayerNorm, in float64: the fused step's calls are
    one per MIN_UNIT tensors of the stack and one for the LayerNorm."""
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(4, 4) for _ in range(depth)], nn.LayerNorm(4)).double()


def _steps(model: nn.Module, optimizer, steps: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype) * 1e-2
        optimizer.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_lamb_fused_compiles_one_version_for_all_the_blocks_of_a_stack():
    import torch._dynamo
    from torch._dynamo.utils import counters
    from labkit.optim.lamb_fused import compile_units
    torch._dynamo.reset()       # nothing compiled before for these shapes: count what this run adds
    model = _stack()
    assert [len(call) for call in compile_units(list(model.parameters()))] == [8, 8, 2]
    before = counters["stats"]["unique_graphs"]
    fused = _steps(model, Lamb(model.parameters(), lr=0.05, fused=True))
    assert counters["stats"]["unique_graphs"] - before == 2, "the blocks' calls did not share one compiled version"
    reference = _stack()
    start = torch.cat([p.detach().flatten() for p in reference.parameters()])
    readable = _steps(reference, Lamb(reference.parameters(), lr=0.05, foreach=False))
    assert (readable - start).abs().max() > 1e-3, "the parameters did not move"
    torch.testing.assert_close(fused, readable, rtol=0, atol=1e-13)


def test_lamb_fused_calls_the_step_once_per_unit_or_once_for_the_whole_group(monkeypatch):
    # The calls' structure, with the step eager (no compile) and the cut given: one call per unit, the
    # cut found once; fused_units=False (the benchmark's lamb-fused-whole) one call. The same result.
    from labkit.optim import lamb_fused
    sizes = []

    def counting(*args, **kwargs):
        sizes.append(len(args[0]))
        return lamb_fused.fused_lamb_step(*args, **kwargs)

    monkeypatch.setattr(lamb_fused, "compiled_fused_lamb_step", lambda: counting)
    cuts = []
    monkeypatch.setattr(lamb_fused, "compile_units",
                        lambda ps: cuts.append(len(ps)) or [[0, 1], list(range(2, len(ps)))])
    results = {}
    for units in (True, False):
        sizes.clear()
        model = _stack()
        optimizer = Lamb(model.parameters(), lr=0.05, fused=True)
        optimizer.fused_units = units
        results[units] = _steps(model, optimizer, steps=2)
        assert sizes == ([2, 16] * 2 if units else [18] * 2), (units, sizes)
    assert cuts == [18], "the cut into calls was not found once for the optimizer's list of tensors"
    torch.testing.assert_close(results[True], results[False], rtol=0, atol=1e-15)


def test_lamb_fused_falls_back_for_the_calls_left_when_compile_runs_out_mid_step():
    # The stack's two calls of blocks share a version; the LayerNorm's call needs a second, which
    # recompile_limit=1 refuses: those two tensors take the foreach path, the blocks keep theirs.
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    model = _stack()
    optimizer = Lamb(model.parameters(), lr=0.05, fused=True)
    before = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(recompile_limit=1), pytest.warns(RuntimeWarning, match="recompile_limit"):
        fused = _steps(model, optimizer)
    torch._dynamo.reset()
    assert counters["stats"]["unique_graphs"] - before == 1, "the blocks' calls did not run compiled first"
    assert not optimizer.fused
    reference = _stack()
    readable = _steps(reference, Lamb(reference.parameters(), lr=0.05, foreach=False))
    torch.testing.assert_close(fused, readable, rtol=0, atol=1e-13)


def _triton_missing() -> Exception:
    from torch._inductor.exc import TritonMissing
    return TritonMissing(first_useful_frame=None)


@pytest.mark.parametrize("failure, message", [
    (lambda: RuntimeError("no compiler here"), "RuntimeError: no compiler here"),    # dynamo: BackendCompilerFailed
    (_triton_missing, "TritonMissing: Cannot find a working triton installation")])  # raised as it is
def test_lamb_fused_falls_back_for_the_calls_left_when_a_compile_fails_mid_step(monkeypatch, failure, message):
    # A compile that fails (no C++ compiler, no Triton, a GPU too old for it) raises before the call runs: the
    # blocks' calls compiled and ran, the LayerNorm's failed; its two tensors take the foreach path, and the step
    # is the readable one's
    import torch._dynamo
    from labkit.optim import lamb_fused
    compiles = []

    def backend(graph, example_inputs):
        compiles.append(len(example_inputs))
        if len(compiles) > 1:
            raise failure()
        return graph.forward

    torch._dynamo.reset()
    compiled = torch.compile(lamb_fused.fused_lamb_step, backend=backend, fullgraph=True, dynamic=False)
    monkeypatch.setattr(lamb_fused, "compiled_fused_lamb_step", lambda: compiled)
    model = _stack()
    optimizer = Lamb(model.parameters(), lr=0.05, fused=True)
    with pytest.warns(RuntimeWarning, match=r"torch.compile failed \(" + message):
        fused = _steps(model, optimizer)
    torch._dynamo.reset()
    assert len(compiles) == 2 and not optimizer.fused and optimizer.foreach
    reference = _stack()
    readable = _steps(reference, Lamb(reference.parameters(), lr=0.05, foreach=False))
    torch.testing.assert_close(fused, readable, rtol=0, atol=1e-13)


def test_a_copied_or_pickled_lamb_keeps_its_code_path():
    # torch's Optimizer keeps only defaults, state and param groups when pickled or deep-copied; the
    # copy must still step, by the same path (it raised AttributeError before __getstate__ kept them)
    import copy
    import pickle
    model = _stack(depth=2)
    optimizer = Lamb(model.parameters(), lr=0.05, foreach=False)
    optimizer.fused_units = False
    for twin in (copy.deepcopy(optimizer), pickle.loads(pickle.dumps(optimizer))):
        assert (twin.foreach, twin.fused, twin.fused_units, twin._units) == (False, False, False, {})
    # a model and its optimizer copied together (the way a checkpoint in memory is made): the copy steps
    # as the original does
    twin_model, twin = copy.deepcopy((model, optimizer))
    torch.testing.assert_close(_steps(twin_model, twin, steps=2), _steps(model, optimizer, steps=2),
                               rtol=0, atol=1e-15)


def test_lamb_fused_step_in_bfloat16_with_float32_norms_is_the_float64_step_rounded():
    # The plain function (not compiled; the GPU tests compile it): bf16 parameters and moments, norms
    # summed in float32, against the readable step in float64 from the same values.
    from labkit.optim.lamb_fused import fused_lamb_step, step_scalars
    from lamb_numerics import assert_step_close, float64_step
    torch.manual_seed(0)
    hyper = dict(lr=0.05, weight_decay=0.1, max_weight_norm=10.0)
    params = [(torch.randn(300, 40) * 0.1).bfloat16(), (torch.randn(7) * 0.1).bfloat16()]
    grads = [(torch.randn_like(p, dtype=torch.float32) * 1e-2).bfloat16() for p in params]
    before = [p.clone() for p in params]
    reference, reference_ratios = float64_step(before, grads, **hyper)
    group = dict(betas=(0.9, 0.999), eps=1e-6, bias_correction=True, weight_decay=0.1, max_weight_norm=10.0)
    ratios = fused_lamb_step(params, grads, [torch.zeros_like(p) for p in params],
                             [torch.zeros_like(p) for p in params],
                             step_scalars(hyper["lr"], 1, group, "cpu", torch.float32), adapt=True)
    assert ratios.dtype == torch.float32
    torch.testing.assert_close(ratios.double(), torch.stack(reference_ratios), rtol=4 * 2 ** -7, atol=0)
    assert_step_close(before, params, reference, torch.bfloat16)


def test_lamb_param_groups_equal_timm_with_the_same_exclusions():
    Timm = timm_lamb()

    def timm_groups(model):
        groups = lamb_param_groups(model, weight_decay=0.1)
        for g in groups:
            g["always_adapt"] = g.pop("adapt", True)
        return Timm(groups, lr=0.01, max_grad_norm=None)

    ours, model = _train(lambda m: Lamb(lamb_param_groups(m, weight_decay=0.1), lr=0.01))
    theirs, _ = _train(timm_groups)
    _assert_same(ours, theirs)
    groups = lamb_param_groups(model)
    assert {id(p) for p in groups[1]["params"]} == {id(model.inp.bias), id(model.norm.weight),
                                                   id(model.norm.bias), id(model.out.bias)}


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "readable"])
def test_first_lamb_step_follows_the_formula_and_records_trust_ratios(foreach):
    torch.manual_seed(0)
    model = Net().double()
    opt = Lamb(model.parameters(), lr=0.01, weight_decay=0.1, eps=1e-6, foreach=foreach)
    x, y = _data()
    ((model(x) - y) ** 2).mean().backward()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt.step()
    for name, p in model.named_parameters():
        g, w = p.grad, before[name]
        r = g / (g.abs() + 1e-6)             # step 1: m̂ = g and v̂ = g², whatever the betas
        u = r + 0.1 * w
        expected = w.norm() / u.norm() if w.norm() > 0 else torch.tensor(1.0, dtype=torch.float64)
        ratio = opt.state[p]["trust_ratio"]
        assert torch.allclose(ratio, expected, rtol=1e-12), name
        assert torch.allclose(p.detach(), w - 0.01 * expected * u, rtol=0, atol=1e-14), name
    assert opt.state[model.out.bias]["trust_ratio"] == 1.0        # ‖θ‖ = 0


@pytest.mark.parametrize("kwargs,name", [
    (dict(lr=-1e-3), "lr"), (dict(lr=float("nan")), "lr"), (dict(betas=(1.0, 0.999)), r"betas\[0\]"),
    (dict(betas=(0.9, -0.1)), r"betas\[1\]"), (dict(eps=-1e-8), "eps"), (dict(weight_decay=-0.01), "weight_decay"),
    (dict(max_weight_norm=0.0), "max_weight_norm"),
])
def test_lamb_rejects_bad_hyperparameters_by_name(kwargs, name):
    with pytest.raises(ValueError, match=rf"Lamb: invalid {name}="):
        Lamb(nn.Linear(2, 2).parameters(), **kwargs)


def test_lamb_checks_hyperparameters_of_groups_too():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"Lamb: invalid weight_decay=-1"):
        Lamb([dict(params=[model.weight], weight_decay=-1), dict(params=[model.bias])])


# --- LARS ------------------------------------------------------------------------------------------

def test_lars_without_adaptation_is_sgd_with_momentum_and_weight_decay():
    ours, _ = _train(lambda m: LARS(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3, adapt=False))
    sgd, _ = _train(lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3))
    _assert_same(ours, sgd)


def test_lars_local_learning_rate_follows_the_formula():
    torch.manual_seed(0)
    model = Net().double()
    opt = LARS(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02)
    x, y = _data()
    before = {}
    for step in range(2):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        for name, p in model.named_parameters():
            w, g = p.detach().clone(), p.grad.clone()
            local = 0.02 * w.norm() / (g.norm() + 1e-3 * w.norm()) if w.norm() > 0 else torch.tensor(1.0).double()
            v = 0.9 * before.get(name, (0, torch.zeros_like(w)))[1] + 0.5 * local * (g + 1e-3 * w)
            before[name] = (w - v, v)
        opt.step()
        for name, p in model.named_parameters():
            assert torch.allclose(p.detach(), before[name][0], rtol=0, atol=1e-14), (step, name)
        if step == 0:
            assert opt.state[model.out.bias]["local_lr"] == 1.0       # it started at zero: ‖w‖ = 0


@pytest.mark.parametrize("kwargs,name", [(dict(lr=-0.1), "lr"), (dict(momentum=1.0), "momentum"),
                                         (dict(weight_decay=-1.0), "weight_decay"),
                                         (dict(trust_coefficient=0.0), "trust_coefficient")])
def test_lars_rejects_bad_hyperparameters_by_name(kwargs, name):
    with pytest.raises(ValueError, match=rf"LARS: invalid {name}="):
        LARS(nn.Linear(2, 2).parameters(), **kwargs)


# --- linear scaling and warm-up ----------------------------------------------------------------------

def test_linear_scaling_rule():
    assert scaled_lr(0.1, 8192, 256) == pytest.approx(3.2)      # Goyal et al.'s ResNet-50 setting
    with pytest.raises(ValueError):
        scaled_lr(0.1, 0, 256)


def test_warmup_goes_from_the_small_batch_rate_to_the_scaled_one_linearly():
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=scaled_lr(0.1, 1024, 128))     # k = 8: 0.8
    sched = linear_scaling_warmup(opt, scale=8, warmup_steps=10, total_steps=30, decay="cosine")
    lrs = []
    for _ in range(31):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1)                                  # starts at η, the small-batch rate
    assert lrs[10] == pytest.approx(0.8)                                 # k·η after the warm-up
    steps = [b - a for a, b in zip(lrs[:10], lrs[1:11])]
    assert max(steps) == pytest.approx(min(steps)) and steps[0] == pytest.approx(0.07)   # linear
    assert lrs[20] == pytest.approx(0.4) and lrs[30] == pytest.approx(0.0, abs=1e-12)    # cosine
    assert warmup_factor(25, 8, 10, 30, "linear") == pytest.approx(0.25)
    assert warmup_factor(100, 8, 10) == 1.0


@pytest.mark.parametrize("kwargs", [dict(scale=0.5, warmup_steps=5), dict(scale=2, warmup_steps=-1),
                                    dict(scale=2, warmup_steps=5, decay="cosine"),
                                    dict(scale=2, warmup_steps=5, decay="exp", total_steps=9)])
def test_warmup_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        linear_scaling_warmup(torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1), **kwargs)


# --- AdaScale --------------------------------------------------------------------------------------

def _adascale_worker(implementation, ddp, accumulate, steps=12):
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)   # fairscale sums the local norms in the default dtype
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
        wrapped = nn.parallel.DistributedDataParallel(model) if ddp == "torch" else BucketedDDP(model)
        inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
        cls = fairscale_adascale() if implementation == "fairscale" else AdaScale
        opt = cls(inner, num_gradients_to_accumulate=accumulate)
        g = torch.Generator().manual_seed(100 + dist.get_rank())
        gains = []
        for _ in range(steps):
            for k in range(accumulate):
                x = torch.randn(4, 6, generator=g)
                y = x.sum(1, keepdim=True) + 0.5 * torch.randn(4, 1, generator=g)
                with wrapped.no_sync() if k < accumulate - 1 else contextlib.nullcontext():
                    (((wrapped(x) - y) ** 2).mean() / accumulate).backward()
            opt.step()
            gains.append(opt.gain())
            opt.zero_grad()
        return gains, torch.cat([p.detach().flatten() for p in model.parameters()])
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("world_size,accumulate", [(2, 1), (3, 1), (2, 2)])
def test_adascale_gain_and_parameters_equal_fairscale(world_size, accumulate):
    theirs = labkit.launch(_adascale_worker, "fairscale", "torch", accumulate, world_size=world_size)
    ours = labkit.launch(_adascale_worker, "labkit", "torch", accumulate, world_size=world_size)
    ours_bucketed = labkit.launch(_adascale_worker, "labkit", "labkit", accumulate, world_size=world_size)
    (their_gains, their_params), (gains, params) = theirs[0], ours[0]
    assert 1.05 < max(gains) <= world_size * accumulate            # a gain that is not trivially 1
    assert gains == pytest.approx(their_gains, rel=1e-12)
    assert torch.allclose(params, their_params, rtol=0, atol=1e-13)
    assert ours_bucketed[0][0] == pytest.approx(their_gains, rel=1e-9)   # labkit's DDP: the same local grads
    assert all(torch.equal(r[1], ours[0][1]) for r in ours)              # the replicas agree


def test_adascale_gain_estimates_the_true_noise_and_signal():
    """Gradients with a known mean μ and noise σ² per sample: the smoothed gain must approach
    (σ² + μ²) / (σ²/S + μ²). One process, S = 4 accumulated micro-batches of one sample."""
    torch.manual_seed(0)
    dim, S, sigma = 20, 4, 0.5
    mu = torch.full((dim,), 0.1, dtype=torch.float64)
    w = nn.Parameter(torch.zeros(dim, dtype=torch.float64))
    opt = AdaScale(torch.optim.SGD([w], lr=0.0), world_size=1, num_gradients_to_accumulate=S, smoothing=0.99)
    for _ in range(3000):
        for _ in range(S):
            x = mu + sigma * torch.randn(dim, dtype=torch.float64)
            ((w * x).sum() / S).backward()                 # the gradient is x itself
        opt.step()
        opt.zero_grad()
    var, sqr = dim * sigma ** 2, float(mu.pow(2).sum())
    expected = (var + sqr) / (var / S + sqr)
    assert expected > 2.5                                   # noise dominates: a gain well above 1
    assert opt.gain() == pytest.approx(expected, rel=0.1)
    assert opt.steps == 3000 and 1.0 < opt.progress / opt.steps <= S


def test_adascale_scales_the_learning_rate_by_the_gain_and_keeps_the_schedule():
    w = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = AdaScale(torch.optim.SGD([w], lr=1.0), world_size=1, num_gradients_to_accumulate=2, smoothing=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert opt.param_groups[0]["lr"] == 0.5 and opt.optimizer.param_groups[0]["lr"] == 0.5
    for x in ([1.0, 0.0, 0.0], [0.0, 1.0, 0.0]):          # two orthogonal micro-batch gradients
        ((w * torch.tensor(x, dtype=torch.float64)).sum() / 2).backward()
    opt.step()
    sched.step()
    # mean ‖gᵢ‖² = 1, ‖ḡ‖² = 0.5: σ² = 2·(1 − 0.5)·2/2 = 1, μ² = 0.5 − 1/2 = 0: the gain is S = 2
    assert opt.gain() == pytest.approx(2.0)
    assert torch.allclose(w.detach(), torch.tensor([-0.5, -0.5, 0.0], dtype=torch.float64))   # lr 0.5 × 2 × ḡ
    assert opt.param_groups[0]["lr"] == 0.5                  # the base rate is restored after the step
    assert opt.progress == pytest.approx(2.0)
    saved = opt.state_dict()
    clone = AdaScale(torch.optim.SGD([w], lr=1.0), world_size=1, num_gradients_to_accumulate=2)
    clone.load_state_dict(saved)
    assert clone.progress == opt.progress and clone.gain() == pytest.approx(opt.gain())
    assert clone.optimizer.param_groups is clone.param_groups


def test_adascale_misuse_is_explained():
    w = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="world_size × num_gradients_to_accumulate >= 2"):
        AdaScale(torch.optim.SGD([w], lr=0.1), world_size=1)
    opt = AdaScale(torch.optim.SGD([w], lr=0.1), world_size=1, num_gradients_to_accumulate=2)
    (w.sum()).backward()
    with pytest.raises(RuntimeError, match=r"after 1 backward pass\(es\).*expected num_gradients_to_accumulate = 2"):
        opt.step()
    with pytest.raises(ValueError, match="smoothing"):
        AdaScale(torch.optim.SGD([w], lr=0.1), world_size=2, smoothing=1.0)


# --------------------------------------------------------------------------------------------
# LAMB on sharded optimizer state (exercise 4c's reference)
# --------------------------------------------------------------------------------------------

_SHARDED_SHAPES = ((5, 4), (7,), (2,), (3,))      # (2,) on 3 ranks: one rank holds an empty slice


def _sharded_lamb_worker(steps: int):
    from labkit import comm
    from labkit.optim import sharded_lamb_step
    from labkit.ring import chunk_bounds

    rank, N = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(7)
    whole = [torch.randn(s, generator=g, dtype=torch.float64) * 3 for s in _SHARDED_SHAPES]
    whole[-1].zero_()                                   # a tensor that starts at zero: ratio 1
    mine = [t.reshape(-1)[slice(*chunk_bounds(t.numel(), N)[rank])].clone() for t in whole]
    ms, vs = [torch.zeros_like(p) for p in mine], [torch.zeros_like(p) for p in mine]
    ratios = []
    with comm.record() as events:
        for step in range(1, steps + 1):
            grads = [torch.sin(t.reshape(-1) * step + k)[slice(*chunk_bounds(t.numel(), N)[rank])]
                     for k, t in enumerate(whole)]
            ratios.append(sharded_lamb_step(mine, grads, ms, vs, step, lr=0.05, betas=(0.9, 0.99), eps=1e-6,
                                            weight_decay=0.1))
    return mine, ratios, [(e.op, e.bytes) for e in events]


@pytest.mark.parametrize("world_size", [1, 3])
def test_sharded_lamb_equals_lamb_on_the_whole_tensors(world_size):
    steps = 3
    g = torch.Generator().manual_seed(7)
    initial = [torch.randn(s, generator=g, dtype=torch.float64) * 3 for s in _SHARDED_SHAPES]
    initial[-1].zero_()
    whole = [torch.nn.Parameter(t.clone()) for t in initial]
    opt = Lamb(whole, lr=0.05, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1, foreach=False)
    want_ratios = []
    for step in range(1, steps + 1):
        for k, (p, t) in enumerate(zip(whole, initial)):
            p.grad = torch.sin(t * step + k)            # the worker's gradients, on the whole tensor
        opt.step()
        want_ratios.append([float(opt.state[p]["trust_ratio"]) for p in whole])
    results = labkit.launch(_sharded_lamb_worker, steps, world_size=world_size)
    for k, p in enumerate(whole):
        got = torch.cat([results[r][0][k] for r in range(world_size)])
        assert torch.allclose(got, p.detach().reshape(-1), rtol=1e-12, atol=1e-14), k
    assert want_ratios[0][-1] == 1.0 and want_ratios[0][0] != 1.0
    for r in range(world_size):
        assert torch.allclose(torch.tensor(results[r][1]), torch.tensor(want_ratios), rtol=1e-12, atol=0)
        # one all-reduce per step, of 2·L float64 numbers: every tensor's ‖θ‖² and ‖u‖²
        assert results[r][2] == [("all_reduce", 2 * len(_SHARDED_SHAPES) * 8)] * steps
