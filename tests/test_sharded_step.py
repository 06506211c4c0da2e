"""labkit.sharded_step: every strategy takes one process's steps; what each rank keeps is the prediction of
labkit.memory; what it sends per step is 2Ψ(N−1)/N for DDP and ZeRO 1–2, one more all-gather for FSDP."""

import pytest
import torch

import labkit
from labkit.cost_model import ring_bytes_sent
from labkit.memory import Setup, predict, relative_error
from labkit.models import GPTConfig
from labkit.sharded_step import STRATEGIES, batch_at, train

CONFIG = GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=32)
N, B = 3, 2


@pytest.fixture(scope="module")
def reference():
    return train("single", CONFIG, batch=N * B, dtype=torch.float64)


@pytest.fixture(scope="module")
def runs():
    return {s: labkit.launch(train, s, CONFIG, batch=B, dtype=torch.float64, world_size=N, timeout=120)
            for s in STRATEGIES[1:]}


def _psi(reference):
    return sum(p.numel() for p in reference.params.values())


@pytest.mark.parametrize("strategy", STRATEGIES[1:])
def test_every_strategy_takes_the_steps_of_one_process(strategy, reference, runs):
    for result in runs[strategy]:
        assert result.params.keys() == reference.params.keys()
        for name, want in reference.params.items():
            assert torch.allclose(result.params[name], want, rtol=1e-11, atol=1e-13), (strategy, result.rank, name)


def test_what_each_rank_sends_per_step(reference, runs):
    psi, e = _psi(reference), 8
    share = (N - 1) / N
    ddp = runs["ddp"][0].sent_per_step
    assert ddp == pytest.approx(2 * share * psi * e)                      # all-reduce: 2Ψ(N−1)/N
    for stage in ("zero1", "zero2"):                                      # reduce-scatter + all-gather, padded
        sent = runs[stage][0].sent_per_step
        assert ddp <= sent <= ddp + 2 * share * N * e * 4                 # at most N−1 padding numbers per bucket
    # FSDP: the blocks are gathered twice (forward, backward), the root once (it stays gathered in between)
    root = sum(p.numel() for n, p in reference.params.items() if not n.startswith("blocks."))
    fsdp = runs["fsdp"][0].sent_per_step
    want = share * (psi + (psi - root) * 2 + root) * e
    assert want <= fsdp <= want + 4 * share * N * e * (1 + CONFIG.n_layer)
    assert fsdp < 3 * share * psi * e


@pytest.mark.parametrize("strategy,stage", [("ddp", 0), ("zero1", 1), ("zero2", 2), ("fsdp", 3)])
def test_what_each_rank_keeps_is_the_prediction(strategy, stage, reference, runs):
    # labkit.zero's chunk is a separate copy of the parameters, in their dtype: a master (mixed_precision=True)
    setup = Setup(batch=B, seq_len=CONFIG.block_size, dtype_bytes=8, state_bytes=8, dp=N, zero=stage,
                  mixed_precision=strategy in ("zero1", "zero2"))
    want = predict(CONFIG, setup, num_params=_psi(reference))
    for result in runs[strategy]:
        got = result.memory
        assert got.activations == want.activations
        assert relative_error(want.optimizer, got.optimizer) < 0.01 and relative_error(want.master, got.master) < 0.01
        # stage 1 also keeps its chunk's reduced gradient (Ψ/N) beside the whole ones
        extra = want.gradients / N if stage == 1 else 0
        assert relative_error(want.gradients + extra, got.gradients) < 0.01, (strategy, got, want)
        assert relative_error(want.parameters, got.parameters) < 0.01
    if strategy == "fsdp":       # during the step: the shards, the root and one block at most
        block = (_psi(reference) - sum(p.numel() for n, p in reference.params.items()
                                       if not n.startswith("blocks."))) / CONFIG.n_layer
        root = _psi(reference) - CONFIG.n_layer * block
        for result in runs[strategy]:
            assert result.peak_parameters <= 8 * (_psi(reference) / N + root + block) + 8 * N * 3


def test_the_ring_cost_of_each_collective():
    class E:
        def __init__(self, op, nbytes):
            self.op, self.bytes = op, nbytes

    assert ring_bytes_sent([E("all_reduce", 400)], 4) == 600
    assert ring_bytes_sent([E("reduce_scatter", 400), E("all_gather", 100)], 4) == 300 + 300
    with pytest.raises(ValueError, match="broadcast"):
        ring_bytes_sent([E("broadcast", 4)], 2)


def test_the_data_are_the_same_slices_for_any_world_size():
    x, y = batch_at(3, 6, CONFIG, 16)
    x2, _ = batch_at(3, 6, CONFIG, 16)
    assert torch.equal(x, x2) and torch.equal(y[:, :-1], x[:, 1:])


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="strategy"):
        train("zero3", CONFIG)
    with pytest.raises(RuntimeError, match="process group"):
        train("ddp", CONFIG)
