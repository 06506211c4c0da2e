"""labkit.memory: the prediction of a step's bytes against what one step really keeps."""

import pytest
import torch

from torch.utils.flop_counter import FlopCounterMode

from labkit.memory import (Memory, Setup, activation_bytes, measure, predict, recompute_attention, recompute_blocks,
                           relative_error, step_flops)
from labkit.models import GPT, GPTConfig

CASES = [  # (batch, seq_len, n_embd, n_head, n_layer, vocab, block_size)
    (2, 16, 32, 4, 1, 50, 16),
    (3, 32, 48, 4, 2, 60, 64),      # a sequence shorter than the context window
]


def _measured(config, dtype, batch, seq_len, recompute, optimizer="adam"):
    torch.manual_seed(0)
    model = GPT(config).to(dtype)
    if recompute == "full":
        recompute_blocks(model)
    if recompute == "selective":
        recompute_attention(model)
    opt = (torch.optim.AdamW(model.parameters(), lr=1e-3) if optimizer == "adam" else
           torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9 if optimizer == "sgd_momentum" else 0.0))
    idx = torch.randint(0, config.vocab_size, (batch, seq_len))
    targets = torch.randint(0, config.vocab_size, (batch, seq_len))
    return measure(model, opt, lambda m: m(idx, targets)[1])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("flash", [False, True])
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_the_prediction_is_what_one_step_keeps(case, dtype, flash, recompute):
    b, s, h, a, layers, vocab, block = case
    config = GPTConfig(vocab_size=vocab, block_size=block, n_layer=layers, n_head=a, n_embd=h, flash=flash)
    got = _measured(config, dtype, b, s, recompute)
    want = predict(config, Setup(batch=b, seq_len=s, dtype_bytes=dtype.itemsize, flash=flash, recompute=recompute))
    for kind in ("parameters", "gradients", "optimizer", "activations"):
        assert relative_error(getattr(want, kind), getattr(got, kind)) < 0.01, (kind, getattr(want, kind),
                                                                                 getattr(got, kind))
    assert got.master == 0 and want.master == 0


@pytest.mark.parametrize("optimizer,states", [("sgd", 0), ("sgd_momentum", 1), ("adam", 2)])
def test_the_optimizer_state_per_optimizer(optimizer, states):
    config = GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16)
    got = _measured(config, torch.float32, 2, 8, "none", optimizer)
    want = predict(config, Setup(batch=2, seq_len=8, optimizer=optimizer))
    assert got.optimizer == want.optimizer == states * 4 * GPT(config).num_params()


def test_recomputation_and_flash_save_what_the_formula_says():
    config = GPTConfig(vocab_size=50, block_size=64, n_layer=4, n_head=4, n_embd=32)
    plain, full = (activation_bytes(config, Setup(batch=4, seq_len=64, recompute=r)) for r in ("none", "full"))
    flash = activation_bytes(config, Setup(batch=4, seq_len=64, flash=True))
    assert full < flash < plain
    # doubling the sequence: the written-out attention's a·b·s² term grows 4x, everything else 2x
    longer = activation_bytes(config, Setup(batch=4, seq_len=128))
    assert 2 * plain < longer < 4 * plain


def test_mixed_precision_with_adam_is_16_bytes_per_parameter_and_zero_divides_it():
    config = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)
    psi = GPT(config).num_params()
    base = dict(batch=1, seq_len=16, dtype_bytes=2, mixed_precision=True, dp=4)
    states = [predict(config, Setup(**base, zero=k)) for k in range(4)]
    # 2 (bf16 parameters) + 2 (gradients) + 4 (fp32 master) + 8 (fp32 m and v) = 16 bytes per parameter
    assert states[0].total - states[0].activations == 16 * psi
    assert [m.total - m.activations for m in states] == pytest.approx(
        [16 * psi, 4 * psi + 12 * psi / 4, 2 * psi + 14 * psi / 4, 16 * psi / 4])


def test_tensor_and_pipeline_parallel_divide_what_they_split():
    config = GPTConfig(vocab_size=50, block_size=32, n_layer=4, n_head=4, n_embd=32)
    one = predict(config, Setup(batch=2, seq_len=32))
    tp = predict(config, Setup(batch=2, seq_len=32, tp=2))
    pp = predict(config, Setup(batch=2, seq_len=32, pp=2, micro_batches=8))
    assert tp.parameters == one.parameters / 2 and pp.parameters == one.parameters / 2
    assert one.activations / 2 < tp.activations < one.activations      # LayerNorms and inputs stay whole
    assert pp.activations == pytest.approx(one.activations)             # L/p layers, p micro-batches in flight


@pytest.mark.parametrize("bad,match", [(dict(optimizer="lion"), "optimizer"), (dict(zero=4), "ZeRO stage"),
                                       (dict(recompute="some"), "recompute"), (dict(dp=0), "dp must be positive")])
def test_bad_setups_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        Setup(**{"batch": 1, "seq_len": 8, **bad})


def test_dropout_is_refused_by_the_activation_formula():
    with pytest.raises(ValueError, match="dropout"):
        activation_bytes(GPTConfig(vocab_size=10, dropout=0.1), Setup(batch=1, seq_len=8))


def test_memory_total():
    m = Memory(1, 2, 3, 4, 5)
    assert m.total == 15 and m.as_dict()["total"] == 15


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_the_flops_of_a_step_with_recomputation_are_counted_exactly(recompute):
    config = GPTConfig(vocab_size=60, block_size=64, n_layer=2, n_head=4, n_embd=48)
    torch.manual_seed(0)
    model = GPT(config)
    {"full": recompute_blocks, "selective": recompute_attention}.get(recompute, lambda m: m)(model)
    idx, targets = torch.randint(0, 60, (3, 32)), torch.randint(0, 60, (3, 32))
    with FlopCounterMode(display=False) as counter:
        model(idx, targets)[1].backward()
    assert counter.get_total_flops() == step_flops(config, Setup(batch=3, seq_len=32, recompute=recompute))


def test_selective_recomputation_saves_the_attention_matrices_for_a_few_flops():
    config = GPTConfig(vocab_size=50, block_size=512, n_layer=4, n_head=8, n_embd=64)
    setups = {r: Setup(batch=4, seq_len=512, recompute=r) for r in ("none", "selective", "full")}
    mem = {r: activation_bytes(config, s) for r, s in setups.items()}
    flops = {r: step_flops(config, s) for r, s in setups.items()}
    assert mem["full"] < mem["selective"] < mem["none"] / 2          # long sequences: a·b·s² dominates
    assert flops["none"] < flops["selective"] < flops["full"]
    assert flops["selective"] - flops["none"] < (flops["full"] - flops["none"]) / 2
