"""An emulated network: delay each message as links of latency α and bandwidth 1/β would (lesson 9, issue 18).

On one machine the processes talk through memory: every message is nearly free, and a laptop cannot show what
NVLink against InfiniBand, or 100 Gb/s against 10 Gb/s, does to a training step. Inside ``with
comm.emulate(network):`` every message labkit.comm sends is held until the time the α–β model of lesson 2 gives
it has passed since it was started:

    message            rounds α      bytes β (per rank, ring algorithms; M = the bytes handed in)
    send / recv        1             M
    all_reduce         2(N−1)        2(N−1)/N · M
    reduce_scatter     N−1           (N−1)/N · M
    all_gather         N−1           (N−1) · M      (M: one rank's part)
    broadcast, gather  N−1           M              (a pipelined chain)
    barrier, objects   N−1           0

A message between ranks of one node uses the ``inside`` link; one whose group spans nodes (rank // ranks_per_node
differ) the ``between`` link, the slower one. A rank's messages queue on its link (one queue for what it sends and
its collectives, one for what it receives): a message started while another is on the wire is done its modelled
time after that one. The delay replaces nothing: it is the earliest the call may return (if the real message took
longer, it took longer), and it is applied on the rank that waits for the message. Off unless asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Link", "Network", "message_cost"]


@dataclass(frozen=True)
class Link:
    """A link class: ``alpha`` seconds per message, ``bandwidth`` bytes per second (β = 1/bandwidth)."""
    alpha: float
    bandwidth: float

    def __post_init__(self):
        if self.alpha < 0 or self.bandwidth <= 0:
            raise ValueError(f"a link needs alpha >= 0 and bandwidth > 0, got {self.alpha}, {self.bandwidth}")

    def seconds(self, rounds: float, nbytes: float) -> float:
        return rounds * self.alpha + nbytes / self.bandwidth


def message_cost(op: str, world_size: int, nbytes: float) -> tuple[float, float]:
    """(rounds, bytes through one rank's link) of one message or collective, from the module's table."""
    n = world_size
    if op in ("send", "recv"):
        return 1.0, float(nbytes)
    if n <= 1:
        return 0.0, 0.0
    table = {"all_reduce": (2 * (n - 1), 2 * (n - 1) / n * nbytes),
             "reduce_scatter": (n - 1, (n - 1) / n * nbytes),
             "all_gather": (n - 1, (n - 1) * nbytes),
             "broadcast": (n - 1, nbytes), "gather": (n - 1, nbytes)}
    rounds, sent = table.get(op, (n - 1, 0.0))          # barrier, broadcast_objects, all_gather_objects
    return float(rounds), float(sent)


@dataclass(frozen=True)
class Network:
    """Two link classes: ``inside`` a node and ``between`` nodes of ``ranks_per_node`` ranks (one node: no
    ``between``)."""
    inside: Link
    between: Link | None = None
    ranks_per_node: int | None = None

    def __post_init__(self):
        if (self.between is None) != (self.ranks_per_node is None):
            raise ValueError("give both `between` and `ranks_per_node`, or neither (one node)")
        if self.ranks_per_node is not None and self.ranks_per_node < 1:
            raise ValueError(f"ranks_per_node must be positive, got {self.ranks_per_node}")

    def link(self, ranks) -> Link:
        """The link a message among these global ranks crosses: the slower one if they are on several nodes."""
        if self.between is None or len({r // self.ranks_per_node for r in ranks}) <= 1:
            return self.inside
        return self.between

    def seconds(self, op: str, ranks, nbytes: float) -> float:
        """What the message ``op`` of ``nbytes`` among ``ranks`` takes on this network."""
        rounds, sent = message_cost(op, len(ranks), nbytes)
        return self.link(ranks).seconds(rounds, sent)
