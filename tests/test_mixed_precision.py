"""labkit.mixed_precision: master weights, the loss scaler against torch's GradScaler, bf16 all-reduce."""

import pytest
import torch
import torch.distributed as dist

import labkit
from labkit.memory import Setup, measure, predict
from labkit.mixed_precision import LossScaler, MasterWeights, underflow_fraction, update_survives
from labkit.models import GPT, GPTConfig

CONFIG = GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=32)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, CONFIG.vocab_size, (2, 16), generator=g),
            torch.randint(0, CONFIG.vocab_size, (2, 16), generator=g))


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def test_master_weights_on_an_fp32_model_are_plain_adamw():
    torch.manual_seed(0)
    a = GPT(CONFIG)
    b = GPT(CONFIG)
    b.load_state_dict(a.state_dict())
    plain, master = _adamw(a.parameters()), MasterWeights(b.parameters(), _adamw)
    for step in range(3):
        for model, opt in ((a, plain), (b, master)):
            opt.zero_grad()
            model(*_batch(step))[1].backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_bf16_loses_small_updates_and_master_weights_keep_them():
    """AdamW moves each weight by about lr = 3e-4 per step. A LayerNorm weight starts at 1.0, where bf16's
    numbers are 2^-7 apart: in bf16 alone every update rounds away and the weights never move; with fp32
    master weights the updates add up (in the master) and the bf16 copy moves once they pass half a step."""
    x, y = _batch(0)
    layernorm = {}
    for name in ("fp32", "bf16 + master", "bf16 alone"):
        torch.manual_seed(0)
        model = GPT(CONFIG).to(torch.float32 if name == "fp32" else torch.bfloat16)
        opt = (MasterWeights(model.parameters(), lambda ps: torch.optim.AdamW(ps, lr=3e-4))
               if name == "bf16 + master" else torch.optim.AdamW(model.parameters(), lr=3e-4))
        for _ in range(20):
            opt.zero_grad()
            model(x, y)[1].backward()
            opt.step()
        layernorm[name] = torch.cat([p.detach().float().reshape(-1) for n, p in model.named_parameters()
                                     if ".ln_" in n and n.endswith("weight")])
        if name == "bf16 + master":
            masters = dict(zip([n for n, _ in model.named_parameters()], opt.master))
            master_ln = torch.cat([m.detach().reshape(-1) for n, m in masters.items()
                                   if ".ln_" in n and n.endswith("weight")])
    assert (layernorm["fp32"] != 1).all()
    assert (layernorm["bf16 alone"] == 1).all()
    assert (layernorm["bf16 + master"] != 1).float().mean() > 0.3
    assert torch.allclose(master_ln, layernorm["fp32"], atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_measured_bytes_are_16_per_parameter_plus_activations(dtype):
    torch.manual_seed(0)
    model = GPT(CONFIG).to(dtype)
    opt = MasterWeights(model.parameters(), _adamw, scaler=LossScaler(init_scale=8.0))
    x, y = _batch()
    got = measure(model, opt, lambda m: opt.scaler.scale_loss(m(x, y)[1]))
    want = predict(CONFIG, Setup(batch=2, seq_len=16, dtype_bytes=2, mixed_precision=True))
    assert opt.skipped == 0
    assert got.as_dict() == pytest.approx(want.as_dict())
    psi = model.num_params()
    assert got.total - got.activations == 16 * psi


def test_the_loss_scaler_follows_torchs_grad_scaler():
    ours = LossScaler(init_scale=16.0, growth_interval=3)
    theirs = torch.amp.GradScaler("cpu", init_scale=16.0, growth_interval=3)
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=0.1)
    for overflow in [0, 0, 0, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0]:
        grad = torch.tensor([1.0, float("inf") if overflow else 2.0, 3.0])
        theirs.scale(torch.tensor(1.0))
        p.grad = grad * theirs.get_scale()
        theirs.unscale_(opt)
        found = sum(v.item() for v in theirs._per_optimizer_states[id(opt)]["found_inf_per_device"].values())
        theirs.step(opt)
        theirs.update()
        mine = grad * ours.scale
        assert ours.unscale_([mine]) == bool(found) == bool(overflow)
        ours.update(bool(found))
        assert ours.scale == theirs.get_scale()
        if not overflow:
            assert torch.equal(mine, grad)


def test_fp16_gradients_underflow_and_loss_scaling_keeps_them():
    torch.manual_seed(0)
    model = GPT(CONFIG)
    x, y = _batch()
    model(x, y)[1].backward()
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()]) * 1e-4   # a late, small loss
    assert underflow_fraction(grads, torch.float16) > 0.1
    assert underflow_fraction(grads * 2.0 ** 12, torch.float16) < 0.01
    assert underflow_fraction(grads, torch.bfloat16) == 0.0


def test_an_update_below_the_precision_of_the_weight_is_lost():
    assert not update_survives(1.0, 1e-3, torch.bfloat16)       # 2^-8 ≈ 3.9e-3 is bf16's half step at 1
    assert update_survives(1.0, 1e-2, torch.bfloat16)
    assert update_survives(1.0, 1e-3, torch.float16) and update_survives(1.0, 1e-6, torch.float32)


def test_a_scaler_that_overflows_skips_the_step_and_backs_off():
    torch.manual_seed(0)
    model = GPT(CONFIG).to(torch.float16)
    before = [p.detach().clone() for p in model.parameters()]
    opt = MasterWeights(model.parameters(), _adamw, scaler=LossScaler(init_scale=2.0 ** 24))
    x, y = _batch()
    opt.scaler.scale_loss(model(x, y)[1]).backward()
    assert opt.step() is False and opt.skipped == 1 and opt.scaler.scale == 2.0 ** 23
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))


def _bf16_all_reduce(n):
    from labkit import comm
    from labkit.data_parallel import all_reduce_mean_

    g = torch.Generator().manual_seed(dist.get_rank())
    grads = [torch.randn(1000, generator=g), torch.randn(7, 3, generator=g)]
    exact = [t.clone() for t in grads]
    all_reduce_mean_(exact)
    with comm.record() as events:
        all_reduce_mean_(grads, dtype=torch.bfloat16)
    error = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(grads, exact))
    sent = [e.bytes for e in events if e.op == "all_reduce"]
    return error, sent, grads[0].dtype


def test_a_bf16_all_reduce_sends_half_the_bytes_with_an_error_of_bf16s_precision():
    results = labkit.launch(_bf16_all_reduce, 3, world_size=3, timeout=60)
    for error, sent, dtype in results:
        assert dtype == torch.float32
        assert 0 < error < 2 ** -6                       # a few roundings of up to 2^-8 relative each
        assert sent == [2 * (1000 + 21)]                 # one message of 2-byte numbers


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="growth_factor"):
        LossScaler(growth_factor=0.5)
    with pytest.raises(ValueError, match="no parameters"):
        MasterWeights([], _adamw)
