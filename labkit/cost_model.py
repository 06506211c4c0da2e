"""The α–β cost model of collective communication, and a fit of α and β from measurements.

Sending a message of m bytes costs α + m·β: α is the latency (start-up time of any message), β the
inverse bandwidth (seconds per byte). Links are full duplex: a link carries β per byte in each
direction at once, so a rank that sends and receives at the same time pays for the larger of the
two, not for their sum. An algorithm that runs in rounds, each round sending one message per rank at
the same time, costs (number of rounds)·α + (bytes through the busiest link, in one direction)·β.
For an all-reduce of M bytes on N ranks:

    ring    2(N-1) rounds; each rank sends 2(N-1)/N·M bytes while it receives as many
                                                         ->  2(N-1)·α + 2(N-1)/N·M·β
    tree    binomial reduce, then broadcast, whole tensors step after step:
            2·ceil(log2 N) steps of M bytes               ->  2·ceil(log2 N)·(α + M·β)
    naive   the root receives N-1 tensors and sends N-1: 2(N-1) messages, and (N-1)·M bytes in each
            direction through its link, which overlap when the root pipelines (sends back the first
            pieces of the sum while later pieces still arrive)
                                                         ->  2(N-1)·α + (N-1)·M·β

The naive term is the central server at its best: a root that first receives everything and only
then sends (labkit.collectives.naive_all_reduce) pays 2(N-1)·M·β. The ring's bandwidth term stays
below 2·M·β for any N (bandwidth-optimal); its latency term grows with N. The tree has few rounds but
moves whole tensors each round; the server moves N-1 whole tensors each way through one rank.
Small messages are latency-bound (tree wins), large ones bandwidth-bound (ring wins).
"""

from __future__ import annotations

import math

import torch

__all__ = ["ALGORITHMS", "terms", "predict", "fit_alpha_beta", "bus_bandwidth", "algorithm_bandwidth", "ring_bytes_sent"]

ALGORITHMS = ("ring", "tree", "naive")


def terms(algorithm: str, world_size: int, nbytes: float) -> tuple[float, float]:
    """(number of α's, number of bytes multiplying β) for one all-reduce of ``nbytes`` on ``world_size``."""
    n = world_size
    if n < 1:
        raise ValueError(f"world_size must be >= 1, not {n}")
    if n == 1:
        return 0.0, 0.0
    if algorithm == "ring":
        return 2.0 * (n - 1), 2.0 * (n - 1) / n * nbytes
    if algorithm == "tree":
        steps = 2 * math.ceil(math.log2(n))
        return float(steps), steps * float(nbytes)
    if algorithm == "naive":  # (N-1)·M in and (N-1)·M out of the root's full-duplex link, overlapped
        return 2.0 * (n - 1), (n - 1) * float(nbytes)
    raise ValueError(f"algorithm must be one of {ALGORITHMS}, not {algorithm!r}")


_RING_SHARE = {  # bytes one rank sends, per byte of its input, when a ring runs the collective on N ranks
    "all_reduce": lambda n: 2 * (n - 1) / n,                # reduce-scatter, then all-gather, of M
    "reduce_scatter": lambda n: (n - 1) / n,                # the input is the whole vector M: N−1 chunks out
    "all_gather": lambda n: n - 1,                          # the input is one chunk: it travels N−1 hops
}


def ring_bytes_sent(events, world_size: int) -> float:
    """The bytes one rank sends for the collectives in ``events`` (labkit.comm's records) if a ring runs them:
    what the ZeRO stages and FSDP cost per step (the backend's own algorithm may differ)."""
    total = 0.0
    for e in events:
        if e.op not in _RING_SHARE:
            raise ValueError(f"no ring cost for {e.op!r}: only {sorted(_RING_SHARE)}")
        total += _RING_SHARE[e.op](world_size) * e.bytes
    return total


def predict(algorithm: str, world_size: int, nbytes: float, alpha: float, beta: float) -> float:
    """Predicted seconds for one all-reduce: α·(rounds) + β·(bytes)."""
    a, b = terms(algorithm, world_size, nbytes)
    return alpha * a + beta * b


def fit_alpha_beta(algorithm: str, measurements) -> tuple[float, float]:
    """Least-squares α and β (both >= 0) from ``[(world_size, nbytes, seconds), ...]``.

    Relative errors are minimised (each equation divided by its measured time), so that the
    microsecond points of small messages count as much as the second-long points of large ones.
    """
    rows, rhs = [], []
    for world_size, nbytes, seconds in measurements:
        a, b = terms(algorithm, world_size, nbytes)
        if seconds <= 0 or (a == 0 and b == 0):
            continue
        rows.append([a / seconds, b / seconds])
        rhs.append(1.0)
    if len(rows) < 2:
        raise ValueError("need at least two measurements with world_size > 1 and positive times")
    A = torch.tensor(rows, dtype=torch.float64)
    y = torch.tensor(rhs, dtype=torch.float64)
    alpha, beta = torch.linalg.lstsq(A, y.unsqueeze(1)).solution.squeeze(1).tolist()
    if alpha < 0 or beta < 0:  # constrained: refit with the negative one held at zero
        col = 1 if alpha < 0 else 0
        only = A[:, col:col + 1]
        value = max(torch.linalg.lstsq(only, y.unsqueeze(1)).solution.item(), 0.0)
        alpha, beta = (0.0, value) if alpha < 0 else (value, 0.0)
    return alpha, beta


def algorithm_bandwidth(nbytes: float, seconds: float) -> float:
    """algbw = M / t (bytes per second), as nccl-tests reports it."""
    return nbytes / seconds


def bus_bandwidth(nbytes: float, seconds: float, world_size: int) -> float:
    """busbw = algbw · 2(N-1)/N: the bytes each rank's link really carried per second in a ring
    all-reduce, comparable across N (nccl-tests' convention)."""
    return algorithm_bandwidth(nbytes, seconds) * 2 * (world_size - 1) / world_size
