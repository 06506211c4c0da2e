"""labkit.compressed_training: each remedy trains, sends the bytes its formula says, and the emulated network
holds each step as long as its messages take."""

import pytest
import torch

import labkit
from labkit.compressed_training import VOCAB_SIZE, parse_method, text_batch, train, train_each
from labkit.models import GPT, GPTConfig
from labkit.network import Link, Network

CONFIG = GPTConfig(vocab_size=VOCAB_SIZE, block_size=16, n_layer=1, n_head=2, n_embd=32)
PSI = GPT(CONFIG).num_params()
N, STEPS = 2, 12


@pytest.fixture(scope="module")
def runs():
    methods = ["allreduce", "bf16", "topk", "powersgd-r1", "localsgd-4", "diloco-4"]
    return {m: labkit.launch(train, m, CONFIG, steps=STEPS, world_size=N, timeout=120) for m in methods}


def test_every_method_trains(runs):
    for method, results in runs.items():
        losses = results[0].losses
        assert losses[-1] < losses[0] - 0.3, (method, losses)
        assert results[0].losses == results[1].losses            # the mean over the ranks, the same on each


def test_the_bytes_of_each_method(runs):
    full = 2 * (N - 1) / N * PSI * 4                             # one all-reduce of the float32 gradients
    assert runs["allreduce"][0].bytes[-1] == pytest.approx(STEPS * full)
    assert runs["bf16"][0].bytes[-1] == pytest.approx(STEPS * full / 2)
    assert runs["localsgd-4"][0].bytes[-1] == pytest.approx(STEPS // 4 * full)
    assert runs["diloco-4"][0].bytes == runs["localsgd-4"][0].bytes
    k = -(-PSI // 100)                                           # ratio 0.01 of the one bucket
    assert runs["topk"][0].bytes[-1] == pytest.approx(STEPS * (N - 1) * k * (4 + 8))
    powersgd = runs["powersgd-r1"][0].bytes
    assert powersgd[1] == pytest.approx(2 * full)                # the first two steps uncompressed
    assert powersgd[-1] - powersgd[-2] < full / 5


def test_the_replicas_agree_at_each_synchronisation(runs):
    for method in ("allreduce", "powersgd-r1", "localsgd-4", "diloco-4"):   # STEPS is a multiple of 4
        a, b = runs[method]
        assert torch.allclose(a.params, b.params, atol=1e-6), method


def test_diloco_with_plain_outer_sgd_of_rate_one_is_local_sgd():
    f64 = dict(steps=6, dtype=torch.float64, world_size=N, timeout=60)
    local = labkit.launch(train, "localsgd-3", CONFIG, **f64)[0]
    diloco = labkit.launch(train, "diloco-3", CONFIG, outer_lr=1.0, outer_momentum=0.0, **f64)[0]
    assert torch.allclose(local.params, diloco.params, atol=1e-10)     # θ − 1·(θ − θ̄) = θ̄, to rounding


def test_train_each_runs_the_methods_in_turn_as_separate_launches_would(runs):
    each = labkit.launch(train_each, ["localsgd-4", "allreduce"], CONFIG, steps=STEPS, world_size=N, timeout=120)[0]
    assert list(each) == ["localsgd-4", "allreduce"]
    for method, run in each.items():           # nothing of one run leaks into the next
        assert run.losses == runs[method][0].losses and torch.equal(run.params, runs[method][0].params), method


def test_sgd_instead_of_adamw():
    sgd = labkit.launch(train, "topk", CONFIG, steps=4, lr=0.3, optimizer="sgd", world_size=N, timeout=60)[0]
    adamw = labkit.launch(train, "topk", CONFIG, steps=4, lr=0.3, world_size=N, timeout=60)[0]
    assert sgd.losses[0] == adamw.losses[0] and sgd.losses[1] != adamw.losses[1]   # same start, other update
    with pytest.raises(labkit.WorkerError, match="optimizer must be 'adamw' or 'sgd'"):
        labkit.launch(train, "topk", CONFIG, steps=1, optimizer="lamb", world_size=1, timeout=60)


def test_the_emulated_network_holds_each_step():
    net = Network(inside=Link(alpha=0.01, bandwidth=1e9))
    slow = labkit.launch(train, "allreduce", CONFIG, steps=3, network=net, world_size=N, timeout=60)[0]
    assert slow.seconds[-1] >= 3 * 2 * (N - 1) * 0.01                 # at least the latency of 3 all-reduces


def test_methods_are_parsed_or_refused():
    assert parse_method("powersgd-r4-noef") == ("powersgd", {"rank": 4, "error_feedback": False})
    assert parse_method("diloco-8") == ("diloco", {"error_feedback": True, "H": 8})
    with pytest.raises(ValueError, match="unknown method"):
        parse_method("zip")
    with pytest.raises(ValueError, match="every how many"):
        parse_method("localsgd")
    x, y = text_batch(0, 3, 8)
    assert torch.equal(x[:, 1:], y[:, :-1])
