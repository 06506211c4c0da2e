"""labkit.comm: the one communication layer (device rule, NCCL-safe point-to-point, one event type)."""

import ast
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import labkit
from labkit import comm

ROOT = Path(__file__).resolve().parents[1]


def _ring_round():
    rank, n = dist.get_rank(), dist.get_world_size()
    mine = torch.full((3,), float(rank))
    got = torch.empty(3)
    with comm.record() as events:
        comm.exchange(mine, (rank + 1) % n, got, (rank - 1) % n)
        total = torch.tensor([float(rank)])
        comm.all_reduce(total)
        handle = comm.isend(torch.zeros(5, dtype=torch.float64), (rank + 1) % n, tag=7)
        inbox = torch.empty(5, dtype=torch.float64)
        comm.recv(inbox, (rank - 1) % n, tag=7)
        handle.wait()
    return got.tolist(), total.item(), [(e.op, e.peer, e.bytes, e.end is not None) for e in events]


@pytest.mark.parametrize("world_size", [2, 3])
def test_messages_arrive_and_each_is_one_event(world_size):
    n = world_size
    for rank, (got, total, events) in enumerate(labkit.launch(_ring_round, world_size=n)):
        assert got == [float((rank - 1) % n)] * 3
        assert total == sum(range(n))
        # exchange = one receive and one send; every event ended once waited
        assert events == [("recv", (rank - 1) % n, 12, True), ("send", (rank + 1) % n, 12, True),
                          ("all_reduce", None, 4, True), ("send", (rank + 1) % n, 40, True),
                          ("recv", (rank - 1) % n, 40, True)]


def _wrong_device(kind):
    t = torch.empty(4, 2, device="meta")
    if kind == "all_reduce":
        comm.all_reduce(t)
    elif kind == "send":
        comm.send(t, (dist.get_rank() + 1) % dist.get_world_size())
    elif kind == "all_gather":
        comm.all_gather([torch.empty(4, 2), torch.empty(4, 2)], t)


@pytest.mark.parametrize("kind", ["all_reduce", "send", "all_gather"])
def test_a_tensor_on_the_wrong_device_names_rank_tensor_and_devices(kind):
    with pytest.raises(labkit.WorkerError) as info:
        labkit.launch(_wrong_device, kind, world_size=2)
    text = str(info.value)
    assert re.search(r"rank [01]: .*shape \(4, 2\) on meta, but this process group \(gloo\) communicates "
                     r"tensors on cpu", text), text


def _group_device():
    return str(comm.device()), str(comm.on(torch.ones(1)).device)


def test_the_device_of_a_gloo_group_is_the_cpu():
    assert labkit.launch(_group_device, world_size=2) == [("cpu", "cpu")] * 2


def _collectives():
    rank, n = dist.get_rank(), dist.get_world_size()
    x = torch.arange(4.0) + rank
    out = torch.empty(n * 4)
    comm.all_gather_into_tensor(out, x)
    rs = torch.empty(2)
    comm.reduce_scatter_tensor(rs, torch.arange(2.0 * n))
    b = torch.tensor([float(rank)])
    with comm.record() as events, comm.label("the broadcast"):
        comm.broadcast(b, src=1)
    assert [(e.op, e.peer, e.label, e.numel, e.bytes) for e in events] == [("broadcast", 1, "the broadcast", 1, 4)]
    inbox = [torch.empty(4) for _ in range(n)] if rank == 0 else None
    comm.gather(x, inbox, dst=0)
    objects = [f"from {rank}"]
    comm.broadcast_objects(objects, src=0)
    everyone = comm.all_gather_objects({"rank": rank})
    comm.barrier()
    return out.tolist(), rs.tolist(), b.item(), inbox and [t.tolist() for t in inbox], objects, everyone


def test_collectives_give_what_torch_gives():
    n = 3
    for rank, (gathered, scattered, b, inbox, objects, everyone) in enumerate(
            labkit.launch(_collectives, world_size=n)):
        assert everyone == [{"rank": r} for r in range(n)]
        assert gathered == [float(i + r) for r in range(n) for i in range(4)]
        assert scattered == [n * float(2 * rank), n * float(2 * rank + 1)]
        assert b == 1.0
        assert objects == ["from 0"]
        if rank == 0:
            assert inbox == [[float(i + r) for i in range(4)] for r in range(n)]


# Every module of labkit sends through labkit.comm; the checkers' interceptors patch torch.distributed
# (what the student calls) and labkit.comm (what labkit's side of a check calls), they do not send.
_OPS = re.compile(r"(send|recv|isend|irecv|all_reduce|all_gather\w*|reduce_scatter\w*|broadcast\w*|reduce|gather|"
                  r"scatter|barrier|batch_isend_irecv|P2POp|all_to_all\w*|monitored_barrier)$")


def _direct_calls(source: str) -> list[int]:
    """The lines that call torch.distributed's communication (``dist.op(...)``, ``torch.distributed.op(...)``,
    or an op imported by name): calls in the syntax tree, so a call named in a message or a docstring is not one."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            lines += [node.lineno for alias in node.names if _OPS.match(alias.name)]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and _OPS.match(node.func.attr):
            if ast.unparse(node.func.value) in ("dist", "torch.distributed"):
                lines.append(node.lineno)
    return sorted(lines)


def _subgroup_and_waits():
    rank = dist.get_rank()
    pair = dist.new_group([1, 2])          # every rank takes part in making it
    got = None
    with comm.record() as events:
        if rank == 1:
            comm.send(torch.tensor([7.0]), 2, group=pair)        # global rank 2, as in torch.distributed.send
        elif rank == 2:
            got = torch.zeros(1)
            assert comm.irecv(got, 1, group=pair).wait(timeout=5.0)
            got = got.item()
        comm.barrier()
        comm.broadcast_objects([rank], src=0)
    return got, [(e.op, e.peer, e.end is not None) for e in events]


def test_peers_are_global_ranks_in_a_subgroup_and_every_event_ends():
    out = labkit.launch(_subgroup_and_waits, world_size=3)
    assert out[2][0] == 7.0
    assert out[1][1] == [("send", 2, True), ("barrier", None, True), ("broadcast_objects", 0, True)]
    assert out[2][1] == [("recv", 1, True), ("barrier", None, True), ("broadcast_objects", 0, True)]


def test_the_scan_finds_calls_and_not_their_names_in_messages():
    source = ("import torch.distributed as dist\n"
              "from torch.distributed import all_reduce, get_rank\n"             # 2: an op imported by name
              "def f(t):\n"
              "    \"\"\"dist.all_reduce(t) in a docstring\"\"\"\n"
              "    x = g('a') + dist.send(t, 1)  # dist.recv(t) in a comment\n"  # 5
              "    msg = f'use dist.all_reduce(t) instead'\n"
              "    keep = dist.all_reduce\n"
              "    torch.distributed.barrier()\n"                                  # 8
              "    return dist.get_rank()\n")
    assert _direct_calls(source) == [2, 5, 8]


def test_lesson_code_sends_every_message_through_comm():
    offenders = []
    for path in sorted((ROOT / "labkit").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel == "labkit/comm.py":
            continue
        lines = path.read_text().splitlines()
        for n in _direct_calls("\n".join(lines)):
            # A checker's wrong versions stand for a student's code, which calls torch.distributed itself; such a
            # call is marked on its line, and only checkers may have one.
            if lines[n - 1].rstrip().endswith("# student's code") and rel.startswith("labkit/checks/"):
                continue
            offenders.append(f"{rel}:{n}: {lines[n - 1].strip()}")
    assert offenders == []
