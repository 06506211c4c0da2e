"""What top-k sends, against the all-reduce it replaces, and when it pays (lesson 9, exercise 9b).

One bucket of M numbers of v bytes on N ranks, each message costed as a ring puts it on the wire from one rank
(:func:`labkit.network.message_cost`, what :mod:`labkit.compressed_training` counts):

    all-reduce, no compression       2(N−1)/N · M · v          about 2Mv whatever N
    top-k, all-gathered              (N−1) · k · (v + i)       k = ⌈ratio · M⌉ values and their indices (i bytes)

Each rank's k entries sit at indices of its own, so they cannot be added up on the way as a ring all-reduce adds
(the positions differ from rank to rank): every rank receives every other rank's k pairs, and what it sends grows
with N. Top-k sends less while (N−1)·k·(v+i) < 2(N−1)/N·M·v, that is, with k = ratio·M,

    ratio < 2v / (N (v + i))       1/3 on 2 ranks, 1/12 on 8, 1/96 ≈ 1 % on 64 (v = 4, i = 8)

the break-even ratio, which falls as 1/N: top-k at 1 % pays on at most 66 ranks.
"""

import math

from labkit.network import message_cost

__all__ = ["topk_k", "topk_bytes", "allreduce_bytes", "break_even_ratio"]


def topk_k(numel: int, ratio: float) -> int:
    """k = ⌈ratio · M⌉ (at least 1): how many entries of a bucket of M numbers top-k sends (labkit.compression)."""
    return max(1, math.ceil(ratio * numel))


def topk_bytes(numel: int, ratio: float, world_size: int, value_bytes: int = 4, index_bytes: int = 8) -> float:
    """Bytes one rank sends for one bucket of ``numel`` numbers with top-k: an all-gather of its k values and one of
    its k indices, (N−1)·k·(v + i)."""
    k = topk_k(numel, ratio)
    return (message_cost("all_gather", world_size, k * value_bytes)[1]
            + message_cost("all_gather", world_size, k * index_bytes)[1])


def allreduce_bytes(numel: int, world_size: int, value_bytes: int = 4) -> float:
    """Bytes one rank sends for one bucket of ``numel`` numbers with a ring all-reduce: 2(N−1)/N·M·v."""
    return message_cost("all_reduce", world_size, numel * value_bytes)[1]


def break_even_ratio(world_size: int, value_bytes: int = 4, index_bytes: int = 8) -> float:
    """The ratio below which top-k sends fewer bytes than the all-reduce, 2v / (N (v + i)) (k taken as ratio·M;
    N ≥ 2: on one rank neither sends anything)."""
    if world_size < 2:
        raise ValueError(f"on {world_size} rank(s) nothing is sent: the break-even ratio needs N ≥ 2")
    return 2 * value_bytes / (world_size * (value_bytes + index_bytes))
