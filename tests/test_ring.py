"""labkit.ring (the schedule and its simulator) and labkit.cost_model: pure, single process."""

import math

import pytest
import torch

from labkit import cost_model, ring

WORLD_SIZES = range(1, 9)


@pytest.mark.parametrize("n", WORLD_SIZES)
def test_schedule_is_the_formula_of_the_lesson(n):
    # concepts §5: reduce-scatter round j, rank i sends chunk (i-j) mod N to (i+1) mod N;
    # all-gather round j, rank i sends chunk (i+1-j) mod N.
    rs, ag = ring.reduce_scatter_rounds(n), ring.all_gather_rounds(n)
    assert len(rs) == len(ag) == n - 1
    assert ring.all_reduce_rounds(n) == rs + ag
    for j, rnd in enumerate(rs):
        assert rnd.phase == "reduce-scatter" and rnd.index == j
        assert rnd.transfers == tuple(ring.Transfer(i, (i + 1) % n, (i - j) % n) for i in range(n))
    for j, rnd in enumerate(ag):
        assert rnd.phase == "all-gather" and rnd.index == j
        assert rnd.transfers == tuple(ring.Transfer(i, (i + 1) % n, (i + 1 - j) % n) for i in range(n))
    for rnd in rs + ag:
        for i in range(n):
            assert rnd.sent_by(i).sender == i
            assert rnd.received_by(i).receiver == i and rnd.received_by(i).sender == (i - 1) % n


@pytest.mark.parametrize("n", WORLD_SIZES)
def test_simulation_reduces_then_gathers(n):
    states = ring.simulate(n)
    everyone = frozenset(range(n))
    assert len(states) == 2 * (n - 1) + 1
    assert states[0] == [[frozenset([r])] * n for r in range(n)]
    for j in range(n - 1):
        after = states[j + 1]
        for i in range(n):
            # the chunk rank i just received holds j+2 consecutive ranks: i, i-1, ..., i-j-1
            received = (i - j - 1) % n
            assert after[i][received] == frozenset((i - k) % n for k in range(j + 2))
    after_rs = states[n - 1]
    for i in range(n):
        assert after_rs[i][(i + 1) % n] == everyone         # rank i owns the full sum of chunk i+1
        # ...and no other chunk is complete yet (for n > 1)
        assert sum(c == everyone for c in after_rs[i]) == 1
    assert all(c == everyone for row in states[-1] for c in row)


@pytest.mark.parametrize("n", WORLD_SIZES)
def test_shifted_phases_give_torch_conventions(n):
    # shift=-1: rank i ends with chunk i (reduce_scatter_single); all-gather shift=0 starts from chunk i.
    states = ring.simulate(n, ring.reduce_scatter_rounds(n, shift=-1))
    assert all(states[-1][i][i] == frozenset(range(n)) for i in range(n))
    for j, rnd in enumerate(ring.all_gather_rounds(n, shift=0)):
        assert [t.chunk for t in rnd.transfers] == [(i - j) % n for i in range(n)]


def test_world_size_must_be_positive():
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="world_size"):
            ring.reduce_scatter_rounds(bad)


def test_chunks_are_tensor_split():
    for m in range(0, 30):
        for n in range(1, 9):
            expected = [len(c) for c in torch.arange(m).tensor_split(n)]
            assert ring.chunk_sizes(m, n) == expected
            bounds = ring.chunk_bounds(m, n)
            assert bounds[0][0] == 0 and bounds[-1][1] == m
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))


def test_elements_sent_per_rank():
    for n in range(1, 9):
        for m in range(0, 40):
            sent = ring.ring_elements_sent(m, n)
            assert sum(sent) == 2 * (n - 1) * m           # every round moves each chunk exactly once
            if m % n == 0:
                assert sent == [2 * (n - 1) * m // n] * n  # the bandwidth-optimal 2(N-1)M/N
            assert max(sent) - min(sent) <= 2 * (n - 1)   # uneven chunks: at most one element per round


# --------------------------------------------------------------------------------------------
# Cost model
# --------------------------------------------------------------------------------------------

def test_terms_follow_the_formulas():
    m = 1000.0
    assert cost_model.terms("ring", 4, m) == (6.0, 1500.0)
    assert cost_model.terms("tree", 4, m) == (4.0, 4000.0)
    assert cost_model.terms("tree", 5, m) == (6.0, 6000.0)
    assert cost_model.terms("naive", 4, m) == (6.0, 3000.0)   # (N-1)·M each way, full duplex
    assert cost_model.terms("ring", 1, m) == (0.0, 0.0)
    with pytest.raises(ValueError, match="algorithm"):
        cost_model.terms("butterfly", 4, m)
    # the ring's bandwidth term stays below 2M for every N; the naive root's grows with N
    assert all(cost_model.terms("ring", n, m)[1] < 2 * m for n in range(2, 100))
    assert cost_model.terms("naive", 64, m)[1] == 63 * m


@pytest.mark.parametrize("algorithm", cost_model.ALGORITHMS)
def test_fit_recovers_alpha_and_beta(algorithm):
    alpha, beta = 50e-6, 1 / 2e9
    points = [(n, b, cost_model.predict(algorithm, n, b, alpha, beta))
              for n in (2, 3, 4, 8) for b in (1e3, 1e5, 1e7)]
    fitted = cost_model.fit_alpha_beta(algorithm, points)
    assert fitted == pytest.approx((alpha, beta), rel=1e-9)


def test_fit_never_returns_negative_parameters():
    # Times that shrink with size would need beta < 0: it is held at zero and alpha refitted.
    points = [(4, 1e3, 2e-3), (4, 1e6, 1e-3), (4, 1e7, 0.9e-3)]
    alpha, beta = cost_model.fit_alpha_beta("ring", points)
    assert beta == 0.0 and alpha > 0
    with pytest.raises(ValueError, match="two measurements"):
        cost_model.fit_alpha_beta("ring", [(1, 1e3, 1e-3), (4, 1e3, 1e-3)])


def test_bandwidths():
    assert cost_model.algorithm_bandwidth(8e6, 0.01) == pytest.approx(8e8)
    assert cost_model.bus_bandwidth(8e6, 0.01, 4) == pytest.approx(8e8 * 1.5)
    assert cost_model.bus_bandwidth(8e6, 0.01, 2) == pytest.approx(8e8)
    assert math.isclose(cost_model.bus_bandwidth(1.0, 1.0, 1000), 2 * 999 / 1000)
