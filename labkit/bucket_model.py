"""When does a step of bucketed DDP end? The buckets' all-reduces on one link, in ready order (lesson 3, Section 7).

Backward produces the gradients one after another: parameter i's gradient has ``sizes[i]`` bytes and is ready at
time ``ready[i]`` (seconds from any fixed origin, e.g. the start of backward). A plan is a list of buckets, each a
list of parameter indices, launched strictly in bucket order (exercise 3c) on one link (one communication stream),
one message after another. Bucket k can start when its last gradient is ready and bucket k − 1 has arrived, and an
all-reduce of m bytes takes α + m·β:

    start_k = max(max over i in bucket k of ready[i], end_{k−1}),     end_k = start_k + α + β · bytes_k

The step ends with the last bucket, end_K; what communication adds to the step is the time exposed after the last
gradient is ready, end_K − max_i ready[i]. α and β are those of one all-reduce of a bucket: for a ring on N ranks,
2(N − 1)·α and 2(N − 1)/N·β of lesson 2 (:func:`labkit.cost_model.terms`).

Few buckets pay α few times but start late; many buckets start early but pay α for each. :func:`best_split` finds
the best plan by trying every contiguous split of the ready order (small cases only: 2^(n−1) splits). A plan cut
in any other order is never better: moving a gradient that is ready earlier into an earlier bucket delays nothing.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence

import torch

from labkit.ddp import plan_buckets

__all__ = ["bucket_times", "step_end", "exposed", "ready_order", "cut_by_cap", "splits", "best_split", "MAX_SEARCH"]

MAX_SEARCH = 16     # best_split tries 2^(n−1) splits: 32768 at n = 16


def bucket_times(buckets: Sequence[Sequence[int]], sizes: Sequence[float], ready: Sequence[float],
                 alpha: float, beta: float) -> list[tuple[float, float]]:
    """(start, end) of each bucket's all-reduce, bucket 0 first: launched in bucket order on one link."""
    times, free = [], -math.inf
    for bucket in buckets:
        start = max(max(ready[i] for i in bucket), free)      # its last gradient, and the link free
        free = start + alpha + beta * sum(sizes[i] for i in bucket)
        times.append((start, free))
    return times


def step_end(buckets: Sequence[Sequence[int]], sizes: Sequence[float], ready: Sequence[float],
             alpha: float, beta: float) -> float:
    """When the last bucket's all-reduce ends: the end of the step's communication."""
    return bucket_times(buckets, sizes, ready, alpha, beta)[-1][1]


def exposed(buckets: Sequence[Sequence[int]], sizes: Sequence[float], ready: Sequence[float],
            alpha: float, beta: float) -> float:
    """The communication left after the last gradient is ready: what the buckets add to the step."""
    return step_end(buckets, sizes, ready, alpha, beta) - max(ready)


def ready_order(ready: Sequence[float]) -> list[int]:
    """The parameter indices in the order their gradients become ready (ties in index order)."""
    return sorted(range(len(ready)), key=lambda i: ready[i])


def cut_by_cap(order: Sequence[int], sizes: Sequence[float], cap_bytes: float) -> list[list[int]]:
    """``order`` cut as BucketedDDP cuts it (:func:`labkit.ddp.plan_buckets`): consecutive buckets of at most
    ``cap_bytes``, a gradient larger than the cap alone in its bucket."""
    stand_ins = [torch.empty(int(sizes[i]), dtype=torch.uint8, device="meta") for i in order]   # no memory
    index = {id(t): i for t, i in zip(stand_ins, order)}
    return [[index[id(t)] for t in bucket] for bucket in plan_buckets(stand_ins, cap_bytes)]


def splits(order: Sequence[int]) -> Iterator[list[list[int]]]:
    """Every way to cut ``order`` into consecutive non-empty buckets (2^(n−1) of them)."""
    n = len(order)
    for cuts in itertools.product((False, True), repeat=max(n - 1, 0)):
        buckets, start = [], 0
        for j, cut in enumerate(cuts, start=1):
            if cut:
                buckets.append(list(order[start:j]))
                start = j
        buckets.append(list(order[start:]))
        yield buckets


def best_split(sizes: Sequence[float], ready: Sequence[float], alpha: float, beta: float) -> list[list[int]]:
    """The plan with the earliest step end, by trying every contiguous split of the ready order (the fewest buckets
    among equal ends). For checking on small cases: at most :data:`MAX_SEARCH` parameters."""
    if len(sizes) > MAX_SEARCH:
        raise ValueError(f"best_split tries 2^(n−1) splits: n = {len(sizes)} is more than {MAX_SEARCH}")
    return min(splits(ready_order(ready)), key=lambda b: (step_end(b, sizes, ready, alpha, beta), len(b)))
