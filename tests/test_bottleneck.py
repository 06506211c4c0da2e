"""labkit.bottleneck: the step-time model of data parallelism and its threshold."""

import pytest

from labkit.bottleneck import SCHEMES, step_time, threshold_tokens
from labkit.network import Link

FAST, SLOW = Link(alpha=0.0, bandwidth=100e9), Link(alpha=0.0, bandwidth=10e9)
COMMON = dict(psi=1e9, flops=100e12, world_size=16, inside=FAST, between=SLOW, ranks_per_node=8)


def test_compute_is_six_flops_per_parameter_per_token_and_the_backward_hides_messages():
    t = step_time("flat", tokens=1000, **COMMON)
    assert t.compute == pytest.approx(6e12 / 100e12)
    assert t.backward == pytest.approx(t.compute * 2 / 3)
    assert t.messages == pytest.approx(2 * 15 / 16 * 4e9 / 10e9)
    assert t.total == pytest.approx(t.compute + t.messages - t.backward)


def test_at_the_threshold_the_messages_just_fit_in_the_backward():
    tokens = threshold_tokens(flops=100e12, bandwidth=10e9, world_size=16)
    at = step_time("flat", tokens=tokens, **COMMON)
    assert at.messages == pytest.approx(at.backward)
    assert step_time("flat", tokens=2 * tokens, **COMMON).exposed == 0
    assert step_time("flat", tokens=tokens / 2, **COMMON).exposed > 0


def test_each_remedy_sends_less_than_the_flat_ring():
    flat = step_time("flat", tokens=100, **COMMON).messages
    for scheme in SCHEMES[1:]:
        assert step_time(scheme, tokens=100, **COMMON).messages < flat, scheme
    assert step_time("bf16", tokens=100, **COMMON).messages == pytest.approx(flat / 2)
    # top-k's all-gather grows with N: at ratio 0.1 it costs more than the ring it replaces
    assert step_time("topk", tokens=100, ratio=0.1, **COMMON).messages > flat


def test_one_node_has_no_hierarchy():
    one = dict(COMMON, world_size=8)
    assert step_time("hierarchical", tokens=1, **one).messages == step_time("flat", tokens=1, **one).messages
    with pytest.raises(ValueError, match="scheme"):
        step_time("zip", tokens=1, **COMMON)
