"""labkit.network and comm.emulate: each message held for its α–β time; the hierarchical all-reduce equals the
flat one and costs what its formula says on two link classes."""

import time

import pytest
import torch
import torch.distributed as dist

import labkit
from labkit.hierarchical import flat_seconds, hierarchical_seconds
from labkit.network import Link, Network, message_cost

INSIDE, BETWEEN = Link(alpha=1e-3, bandwidth=1e9), Link(alpha=5e-3, bandwidth=1e8)
NET = Network(inside=INSIDE, between=BETWEEN, ranks_per_node=2)


def test_message_costs_are_lesson_2s_ring_formulas():
    assert message_cost("all_reduce", 4, 800) == (6, 1200)
    assert message_cost("reduce_scatter", 4, 800) == (3, 600)
    assert message_cost("all_gather", 4, 200) == (3, 600)
    assert message_cost("send", 2, 100) == (1, 100)
    assert message_cost("all_reduce", 1, 800) == (0, 0)
    assert NET.link([0, 1]) == INSIDE and NET.link([1, 2]) == BETWEEN and NET.link([0, 1, 2, 3]) == BETWEEN
    assert NET.seconds("all_reduce", [0, 1, 2, 3], 1e6) == pytest.approx(6 * 5e-3 + 1.5e6 / 1e8)


def test_bad_networks_are_refused():
    with pytest.raises(ValueError, match="bandwidth"):
        Link(1e-3, 0)
    with pytest.raises(ValueError, match="neither"):
        Network(inside=INSIDE, between=BETWEEN)


def _timed():
    from labkit import comm
    from labkit.hierarchical import hierarchical_all_reduce, node_groups

    rank = dist.get_rank()
    inside, across = node_groups(2)
    t = torch.arange(250_001, dtype=torch.float32) * (rank + 1)     # integers: every order of sums is exact
    flat, hier = t.clone(), t.clone()
    out = {}
    with comm.emulate(NET), comm.record() as events:
        start = time.perf_counter()
        comm.all_reduce(flat)
        out["flat"] = (time.perf_counter() - start, events[-1].modelled)
        mark = len(events)
        start = time.perf_counter()
        hierarchical_all_reduce(hier, inside, across)
        out["hierarchical"] = (time.perf_counter() - start, sum(e.modelled for e in events[mark:]))
    with comm.record() as plain:
        comm.all_reduce(t)
    out["equal"] = torch.equal(flat, hier) and torch.equal(flat, t)
    out["unemulated"] = [e.modelled for e in plain]
    return out


def test_emulated_messages_take_their_modelled_time_and_hierarchy_pays_off():
    nbytes = 250_001 * 4
    for out in labkit.launch(_timed, world_size=4, timeout=60):
        assert out["equal"] and out["unemulated"] == [0.0]
        elapsed, modelled = out["flat"]
        assert modelled == pytest.approx(flat_seconds(nbytes, 4, BETWEEN))
        assert elapsed >= modelled                        # held at least as long as the model says
        elapsed, modelled = out["hierarchical"]
        # the chunk of the padded vector crosses the slow link: (M rounded up to k chunks) / k
        assert modelled == pytest.approx(hierarchical_seconds(250_002 * 4, 2, 2, INSIDE, BETWEEN))
        assert elapsed >= modelled
        assert modelled < out["flat"][1] / 2


def test_the_emulation_holds_point_to_point_messages_too():
    def worker():
        from labkit import comm
        t = torch.zeros(1000)
        with comm.emulate(Network(inside=Link(0.02, 1e9))), comm.record() as events:
            start = time.perf_counter()
            comm.exchange(t, 1 - dist.get_rank(), torch.empty(1000), 1 - dist.get_rank())
            return time.perf_counter() - start, [e.modelled for e in events]

    for elapsed, modelled in labkit.launch(worker, world_size=2, timeout=30):
        assert modelled == pytest.approx([0.02 + 4000 / 1e9] * 2)
        assert elapsed >= modelled[0]


def test_a_message_already_due_is_not_held():
    from labkit import comm
    past = comm.CommEvent("all_reduce", None, 8, time.perf_counter() - 2, modelled=1.0, due=time.perf_counter() - 1)
    start = time.perf_counter()
    comm._hold([past])                        # a negative delay: no sleep (and no error)
    assert time.perf_counter() - start < 0.5
