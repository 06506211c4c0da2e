"""When is a data-parallel step limited by communication? A model of one step (lesson 9, issue 18).

A step of data parallelism on N ranks, T tokens per rank, a model of Ψ parameters, F FLOP/s per rank:

    compute     6ΨT / F            (forward 2ΨT, backward 4ΨT: "6 FLOPs per parameter per token")
    messages    what the scheme sends, on the links it crosses (labkit.network's α–β links)
    exposed     max(0, messages − backward): DDP overlaps the all-reduces with the backward (lesson 3),
                so only what outlasts the backward, 4ΨT/F, adds to the step

    step        compute + exposed

The schemes, per step and rank (b bytes per number; k ranks per node, m = N/k nodes):

    flat          a ring over all N ranks, every round crossing the slowest link: 2(N−1)α + 2(N−1)/N·Ψb·β
    hierarchical  reduce-scatter and all-gather inside the node, all-reduce of Ψ/k across (labkit.hierarchical)
    bf16          the flat ring with 2-byte numbers
    powersgd      the flat ring with rank-r factors: about r(n+m)/(nm) of the bytes of each n×m matrix; for the
                  square-ish matrices of a transformer of width h, a fraction ≈ 2r/h (the ``fraction`` given)
    topk          an all-gather of k = ratio·Ψ values and indices: (N−1)α + (N−1)·k·(b + 8)·β

The threshold: messages fit in the backward when 4ΨT/F ≥ bytes·β, i.e. for the flat ring
T ≥ 2(N−1)/N · b · F / (4 · bandwidth): tokens per rank, independent of Ψ ("How to Scale Your Model" derives the
same for data parallelism; lesson 8 did it for FSDP).
"""

from __future__ import annotations

from dataclasses import dataclass

from labkit.hierarchical import flat_seconds, hierarchical_seconds
from labkit.network import Link

__all__ = ["SCHEMES", "StepTime", "step_time", "threshold_tokens"]

SCHEMES = ("flat", "hierarchical", "bf16", "powersgd", "topk")


@dataclass(frozen=True)
class StepTime:
    compute: float
    messages: float
    backward: float

    @property
    def exposed(self) -> float:
        return max(0.0, self.messages - self.backward)

    @property
    def total(self) -> float:
        return self.compute + self.exposed


def step_time(scheme: str, *, psi: float, tokens: float, flops: float, world_size: int, inside: Link,
              between: Link | None = None, ranks_per_node: int | None = None, bytes_per_number: int = 4,
              fraction: float = 0.01, ratio: float = 0.01) -> StepTime:
    """The step of the module's model; ``fraction``: PowerSGD's share of the bytes; ``ratio``: top-k's k/Ψ."""
    n, b = world_size, bytes_per_number
    k = ranks_per_node or n
    nodes = -(-n // k)
    slow = between if (between is not None and nodes > 1) else inside
    compute = 6 * psi * tokens / flops
    if scheme == "flat":
        messages = flat_seconds(psi * b, n, slow)
    elif scheme == "hierarchical":
        messages = (hierarchical_seconds(psi * b, k, nodes, inside, between) if nodes > 1
                    else flat_seconds(psi * b, n, inside))
    elif scheme == "bf16":
        messages = flat_seconds(psi * 2, n, slow)
    elif scheme == "powersgd":
        messages = flat_seconds(psi * b * fraction, n, slow)
    elif scheme == "topk":
        messages = 0.0 if n == 1 else slow.seconds(n - 1, (n - 1) * ratio * psi * (b + 8))
    else:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    return StepTime(compute=compute, messages=messages, backward=compute * 4 / 6)


def threshold_tokens(*, flops: float, bandwidth: float, world_size: int, bytes_per_number: int = 4) -> float:
    """Tokens per rank above which the flat ring's bytes fit in the backward (latency neglected)."""
    n = world_size
    return 2 * (n - 1) / n * bytes_per_number * flops / (4 * bandwidth)
