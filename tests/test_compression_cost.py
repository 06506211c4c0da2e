"""labkit.compression_cost: the bytes of top-k and of the all-reduce equal what labkit's hooks send (comm.record,
costed as a ring), and the break-even ratio separates the two."""

import pytest
import torch
from torch import nn

import labkit
from labkit.compression_cost import allreduce_bytes, break_even_ratio, topk_bytes, topk_k

CASES = ((1000, 0.01, torch.float32), (33, 0.2, torch.float32), (12, 0.2, torch.float64), (5, 0.01, torch.float64))


def _sent(cases):
    """Per case: the bytes this rank sends with labkit's topk_hook and with its allreduce_hook."""
    import torch.distributed as dist

    from labkit import comm
    from labkit.compression import TopKState, allreduce_hook, topk_hook
    from labkit.ddp import Bucket
    from labkit.ddp_hooks import GradBucket
    from labkit.network import message_cost

    n, out = dist.get_world_size(), []
    for numel, ratio, dtype in cases:
        bucket = Bucket([nn.Parameter(torch.zeros(numel, dtype=dtype))], torch.randn(numel, dtype=dtype), [0])
        sent = []
        for run in (lambda: topk_hook(TopKState(ratio=ratio), GradBucket(0, bucket, True)),
                    lambda: allreduce_hook(None, GradBucket(0, bucket, True))):
            with comm.record() as events:
                run()
            sent.append(sum(message_cost(e.op, n, e.bytes)[1] for e in events))
        out.append(sent)
    return out


def test_the_formulas_are_what_labkits_hooks_send():
    n = 3
    for (numel, ratio, dtype), (topk, dense) in zip(CASES, labkit.launch(_sent, CASES, world_size=n)[0]):
        v = torch.finfo(dtype).bits // 8
        assert topk == topk_bytes(numel, ratio, n, value_bytes=v) == (n - 1) * topk_k(numel, ratio) * (v + 8)
        assert dense == allreduce_bytes(numel, n, value_bytes=v) == pytest.approx(2 * (n - 1) / n * numel * v)


def test_k_is_rounded_up_and_at_least_one():
    assert topk_k(1000, 0.01) == 10 and topk_k(33, 0.2) == 7 and topk_k(5, 0.01) == 1


@pytest.mark.parametrize("n", [2, 3, 8, 64, 500])
def test_top_k_sends_less_below_the_break_even_ratio_only(n):
    numel = 10_000_000                                    # k = ratio·M to a part in a million
    ratio = break_even_ratio(n)
    assert topk_bytes(numel, 0.99 * ratio, n) < allreduce_bytes(numel, n) < topk_bytes(numel, 1.01 * ratio, n)
    assert break_even_ratio(n, 2, 4) == pytest.approx(2 * 2 / (n * 6))


def test_one_rank_has_no_break_even():
    with pytest.raises(ValueError, match="N ≥ 2"):
        break_even_ratio(1)
