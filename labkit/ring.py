"""The ring all-reduce as a schedule: for every round, who sends which chunk to whom.

N ranks sit in a ring; rank i sends only to its right neighbour (i+1) mod N and receives only from
its left neighbour (i-1) mod N. A tensor of M elements is cut into N chunks of about M/N elements.

Reduce-scatter, N-1 rounds. In round j rank i sends chunk (i-j) mod N to the right, receives chunk
(i-j-1) mod N from the left and ADDS it to its own copy. Afterwards rank i holds the full sum of
chunk (i+1) mod N.

All-gather, N-1 more rounds. In round j rank i sends chunk (i+1-j) mod N (complete) to the right,
receives chunk (i-j) mod N from the left and OVERWRITES its copy. Afterwards every rank holds every
complete chunk: that is the all-reduce, in 2(N-1) rounds.

Each round every rank sends one chunk, so each rank sends 2(N-1) chunks of M/N elements in all:
2(N-1)/N * M, below 2M however large N is.

The ring to the left (``direction=-1``) is the same ring mirrored (rank i <-> rank -i, chunk c <-> chunk
-c): rank i sends only to (i-1) mod N. A link is full-duplex, and each ring uses it one way only, so
the bidirectional ring sends half the tensor round each at the same time: every link carries half the
elements each way (:func:`bidirectional_elements_sent`), and each round's messages are half as long.

This module is pure (no processes, no torch.distributed): the same schedule drives the simulator
below, the figures (:func:`labkit.ring_figures.draw_ring_round`) and the real execution
(:mod:`labkit.collectives`), so the picture a student studies is exactly what runs.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Transfer", "Round", "reduce_scatter_rounds", "all_gather_rounds", "all_reduce_rounds",
           "chunk_sizes", "chunk_bounds", "simulate", "ring_elements_sent", "bidirectional_elements_sent"]

REDUCE_SCATTER = "reduce-scatter"
ALL_GATHER = "all-gather"


@dataclass(frozen=True)
class Transfer:
    """One message of one round: ``sender`` sends its copy of ``chunk`` to ``receiver``."""
    sender: int
    receiver: int
    chunk: int


@dataclass(frozen=True)
class Round:
    """One round of the ring: every rank sends exactly one chunk, all at the same time."""
    phase: str          # "reduce-scatter" (receiver adds) or "all-gather" (receiver overwrites)
    index: int          # round number within the phase, 0 .. N-2
    transfers: tuple    # one Transfer per rank, ordered by sender

    def sent_by(self, rank: int) -> Transfer:
        return self.transfers[rank]

    def received_by(self, rank: int) -> Transfer:
        """The transfer that arrives at ``rank``: its left neighbour's in the ring to the right (the
        usual case, looked at first), its right neighbour's in the ring to the left."""
        usual = self.transfers[(rank - 1) % len(self.transfers)]
        if usual.receiver == rank:
            return usual
        for t in self.transfers:
            if t.receiver == rank:
                return t
        raise ValueError(f"no transfer of {self.phase} round {self.index} arrives at rank {rank}")


def _check_world_size(world_size: int) -> None:
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, not {world_size!r}")


def _check_direction(direction: int) -> None:
    if direction not in (1, -1) or isinstance(direction, bool):
        raise ValueError(f"direction must be +1 (to the right) or -1 (to the left), not {direction!r}")


def _phase_rounds(phase: str, world_size: int, shift: int, direction: int) -> list[Round]:
    """Round j: rank i sends chunk (i + d(shift-j)) mod N to rank (i+d) mod N, d = ``direction``.
    d = -1 mirrors d = +1 (rank i <-> -i, chunk c <-> -c), so the same proof of correctness holds."""
    _check_world_size(world_size)
    _check_direction(direction)
    n, d = world_size, direction
    return [Round(phase, j, tuple(Transfer(i, (i + d) % n, (i + d * (shift - j)) % n) for i in range(n)))
            for j in range(n - 1)]


def reduce_scatter_rounds(world_size: int, shift: int = 0, direction: int = 1) -> list[Round]:
    """Round j: rank i sends chunk (i-j) mod N to rank (i+1) mod N; afterwards rank i holds the
    full sum of chunk (i+1) mod N.

    ``shift`` renumbers the chunks (rank i sends chunk (i-j+shift)): ``shift=-1`` leaves rank i with
    chunk i, the convention of ``torch.distributed.reduce_scatter_single``.
    ``direction=-1``: the ring to the left, mirrored: rank i sends chunk (i+j-shift) mod N to rank
    (i-1) mod N and ends with chunk (i-1) mod N complete (chunk i with ``shift=-1``).
    """
    return _phase_rounds(REDUCE_SCATTER, world_size, shift, direction)


def all_gather_rounds(world_size: int, shift: int = 1, direction: int = 1) -> list[Round]:
    """Round j: rank i sends chunk (i+1-j) mod N to rank (i+1) mod N. At the start rank i must hold
    chunk (i+1) mod N complete: what reduce-scatter leaves it with.

    ``shift=0`` starts from rank i holding chunk i, the convention of
    ``torch.distributed.all_gather_single``.
    ``direction=-1``: the ring to the left: rank i sends chunk (i-1+j) mod N (``shift=1``) to rank
    (i-1) mod N, starting from the chunk (i-1) mod N that the leftward reduce-scatter completes.
    """
    return _phase_rounds(ALL_GATHER, world_size, shift, direction)


def all_reduce_rounds(world_size: int, direction: int = 1) -> list[Round]:
    """The ring all-reduce: reduce-scatter then all-gather, 2(N-1) rounds (``direction=-1``: round the
    ring to the left)."""
    return (reduce_scatter_rounds(world_size, direction=direction)
            + all_gather_rounds(world_size, direction=direction))


def chunk_sizes(numel: int, world_size: int) -> list[int]:
    """How M elements are cut into N chunks: as equal as possible, the first M mod N chunks one
    larger (as ``torch.tensor_split`` does). With M < N some chunks are empty."""
    _check_world_size(world_size)
    if numel < 0:
        raise ValueError(f"numel must be >= 0, not {numel}")
    q, r = divmod(numel, world_size)
    return [q + 1 if c < r else q for c in range(world_size)]


def chunk_bounds(numel: int, world_size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` of each chunk in the flattened tensor."""
    bounds, start = [], 0
    for size in chunk_sizes(numel, world_size):
        bounds.append((start, start + size))
        start += size
    return bounds


def simulate(world_size: int, rounds: list[Round] | None = None) -> list[list[list[frozenset]]]:
    """Replay a schedule on "contributions" instead of numbers.

    ``states[t][rank][chunk]`` is the set of ranks whose input is summed into ``rank``'s copy of
    ``chunk`` after t rounds (``states[0]``: the start, every rank holds only its own contribution).
    A chunk is complete when the set is every rank. Reduce-scatter rounds take the union (the
    receiver adds), all-gather rounds replace (the receiver overwrites).
    """
    rounds = all_reduce_rounds(world_size) if rounds is None else rounds
    state = [[frozenset([rank]) for _ in range(world_size)] for rank in range(world_size)]
    states = [state]
    for rnd in rounds:
        new = [list(row) for row in state]
        for t in rnd.transfers:  # all sends of a round happen at once: read from the old state
            incoming = state[t.sender][t.chunk]
            if rnd.phase == REDUCE_SCATTER:
                new[t.receiver][t.chunk] = state[t.receiver][t.chunk] | incoming
            else:
                new[t.receiver][t.chunk] = incoming
        state = new
        states.append(state)
    return states


def ring_elements_sent(numel: int, world_size: int, direction: int = 1) -> list[int]:
    """Elements each rank sends in one ring all-reduce, counted from the schedule:
    the sizes of the chunks it sends, summed over the 2(N-1) rounds. With N dividing M this is
    exactly 2(N-1)·M/N for every rank."""
    sizes = chunk_sizes(numel, world_size)
    sent = [0] * world_size
    for rnd in all_reduce_rounds(world_size, direction):
        for t in rnd.transfers:
            sent[t.sender] += sizes[t.chunk]
    return sent


def bidirectional_elements_sent(numel: int, world_size: int) -> list[tuple[int, int]]:
    """The bidirectional ring: the first half of the tensor (``chunk_bounds(M, 2)[0]``) round the ring
    to the right, the second half round the ring to the left, in the same 2(N-1) rounds. Per rank:
    (elements sent to the right, elements sent to the left), each about (N-1)·M/N: every link carries
    half of what the one-way ring puts on it, in each direction."""
    (a, b), (_, c) = chunk_bounds(numel, 2)
    return list(zip(ring_elements_sent(b - a, world_size, 1), ring_elements_sent(c - b, world_size, -1)))
