"""The hierarchical all-reduce: the fast links inside a node carry most of the bytes (lesson 9, issue 18).

N = k·m ranks on m nodes of k. A flat ring crosses the slow links between nodes for every chunk: each rank sends
2(N−1)/N·M bytes through the slowest link it uses. Hierarchically (Horovod, NCCL's trees and rings per node):

    1. reduce-scatter inside each node          rank j of a node holds chunk j (M/k bytes) summed over its node
    2. all-reduce chunk j across the nodes      between the m ranks with local index j: only M/k bytes each
    3. all-gather inside each node              every rank has the whole sum

Time on links (α_in, β_in) inside and (α_out, β_out) between nodes (:func:`hierarchical_seconds`):

    2(k−1)·α_in + 2(k−1)/k·M·β_in  +  2(m−1)·α_out + 2(m−1)/m·(M/k)·β_out

against the flat ring's 2(N−1)·α_out + 2(N−1)/N·M·β_out: the slow links carry k times fewer bytes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from labkit import comm
from labkit.network import Link
from labkit.tensor_parallel_gpt import grid_groups

__all__ = ["node_groups", "hierarchical_all_reduce", "hierarchical_seconds", "flat_seconds"]


def node_groups(ranks_per_node: int):
    """(inside, across): the calling rank's node (ranks node·k … node·k + k − 1) and the ranks with its local index
    on every node. Every rank must call it (dist.new_group is collective)."""
    world = dist.get_world_size()
    if world % ranks_per_node:
        raise ValueError(f"the world size {world} is not a whole number of nodes of {ranks_per_node} ranks")
    return grid_groups(world // ranks_per_node, ranks_per_node)


def hierarchical_all_reduce(tensor: torch.Tensor, inside, across) -> None:
    """Sum ``tensor`` over every rank, in place: reduce-scatter inside the node, all-reduce across, all-gather."""
    k = dist.get_world_size(inside)
    flat = tensor.reshape(-1)
    chunk = -(-flat.numel() // k)
    padded = flat.new_zeros(k * chunk)
    padded[:flat.numel()] = flat
    mine = flat.new_empty(chunk)
    comm.reduce_scatter_tensor(mine, padded, group=inside)
    comm.all_reduce(mine, group=across)
    comm.all_gather_into_tensor(padded, mine, group=inside)
    tensor.copy_(padded[:flat.numel()].view_as(tensor))


def hierarchical_seconds(nbytes: float, ranks_per_node: int, nodes: int, inside: Link, between: Link) -> float:
    k, m = ranks_per_node, nodes
    return (inside.seconds(2 * (k - 1), 2 * (k - 1) / k * nbytes)
            + between.seconds(2 * (m - 1), 2 * (m - 1) / m * nbytes / k))


def flat_seconds(nbytes: float, world_size: int, link: Link) -> float:
    n = world_size
    return link.seconds(2 * (n - 1), 2 * (n - 1) / n * nbytes)
