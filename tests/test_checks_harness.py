"""The shared pieces of labkit.checks.harness that the checkers build on: the fixed text of a mistake's message,
the stubs named as not written, comparing with None, a measured factor in words, a student's value described, and
the ranks deciding together whether to run the table's wrong versions."""

import pytest
import torch

import labkit
from labkit.checks import CheckFailed, run_on_ranks
from labkit.checks.harness import (Board, Described, Mistake, Watch, all_ranks, board_dir, close, element_text,
                                   everyone, factor, factor_words, keep, literal_parts, not_written, variants_if_wrong)


def test_literal_parts_are_the_text_around_the_fields():
    assert literal_parts("; y is {times}, after {calls}. f's forward must be the identity.") == [
        "; y is ", ", after ", ". f's forward must be the identity."]
    assert literal_parts("{what} {how}") == []


def _stub():
    raise NotImplementedError("Exercise 9a: write me")


def _own():
    raise NotImplementedError


def test_not_written_names_every_unwritten_piece_and_skips_the_written_ones():
    def written():
        raise ValueError("a bug, not a stub: the check will say")
    error = not_written([("9a", "f", _stub), ("9b", "g", written), ("9c", "h", _own), ("9d", "k", lambda: None)],
                        NotImplementedError("Exercise 9a: write me"), "9")
    assert str(error) == ("Exercise 9a: write me\nNot written yet either:\n"
                          "  Exercise 9c: h is not written yet (it raised NotImplementedError)")


def test_not_written_without_a_probe_finding_one_words_the_error_itself():
    assert str(not_written([], NotImplementedError("todo"), "9")) == (
        "Exercise 9: your code raised NotImplementedError('todo'); see the instructions above")
    assert str(not_written([], NotImplementedError("Exercise 9b: write g"), "9")) == "Exercise 9b: write g"


def test_close_accepts_none_as_nothing_expected():
    t = torch.arange(3.0)
    assert close(None, None)
    assert not close(None, t)
    assert not close(t, None)
    assert close(t, t.clone()) and not close(t, t + 1)


def test_factor_is_measured_and_named_against_tp():
    want = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    assert factor(want, 3 * want) == pytest.approx(3)
    assert factor(want, want + 1) is None
    assert factor(want, None) is None and factor(want, torch.ones(2)) is None
    assert factor(torch.zeros(3), torch.zeros(3)) is None
    assert factor_words(3.0, 3) == "tp times too large (measured factor 3 = tp)"
    assert factor_words(1 / 3, 3) == "tp times too small (measured factor 1/3)"
    assert factor_words(9.0, 3) == "tp² times too large (measured factor 9 = tp²)"
    assert factor_words(0.0, 3) == "zero"
    assert factor_words(2.5, 3) == "" and factor_words(None, 3) == ""
    assert factor_words(4.0, 4, name="N") == "N times too large (measured factor 4 = N)"


def test_a_students_value_is_kept_and_described():
    t = torch.ones(2, requires_grad=True)
    kept = keep(t * 2)
    assert not kept.requires_grad and torch.equal(kept, torch.full((2,), 2.0))
    assert keep(None) is None
    assert keep([1, 2]) == "a list, [1, 2]" and isinstance(keep([1, 2]), Described)
    want = torch.zeros(2, 3)
    assert element_text("y", want, None) == "y is None, expected a tensor of shape (2, 3)"
    assert element_text("y", want, keep((1,))) == "y is a tuple, (1,), expected a tensor of shape (2, 3)"
    assert element_text("y", want, 0.5) == "y is a float (0.5), expected a tensor of shape (2, 3)"
    assert element_text("y", want, torch.zeros(3)) == "y has shape (3,), expected (2, 3)"


def test_a_rank_that_went_on_in_the_checkers_code_is_named_when_asked():
    states = {0: {"state": "waiting", "op": "all_reduce", "peer": None, "count": 1, "time": 0.0},
              1: {"state": "checking", "time": 0.0}}
    hint = ("→ rank 1 went on without that call: every rank must call the same collectives in the same order "
            "(a collective inside `if rank == ...:`?).")
    assert hint in Watch(["all_reduce"], deadline=1.0, hint_checking=True).stuck_hints(states)
    assert hint not in Watch(["all_reduce"], deadline=1.0).stuck_hints(states)


def test_running_and_checking_are_written_on_the_board():
    with board_dir() as path:
        board = Board(path, 0, 1)
        watch = Watch(["all_reduce"], deadline=1.0, board=board)
        watch.checking()
        assert board.states()[0]["state"] == "checking"
        watch.running()
        assert board.states()[0]["state"] == "running"


def _decide(right_ranks, board_path):
    """Rank r is right when r is in ``right_ranks``; returns what it ran and the states its board went through."""
    rank = torch.distributed.get_rank()
    seen = []

    class Recording(Watch):
        def _state(self, state, **info):
            seen.append(state)
            super()._state(state, **info)

    watch = Recording(["all_reduce"], deadline=5.0, board=Board(board_path, rank, 2))
    together = all_ranks(rank in right_ranks, watch)
    table = [Mistake("double", 2, "twice"), Mistake("triple", 3, "thrice")]
    return together, seen, variants_if_wrong(rank in right_ranks, table, lambda variant: variant * (10 + rank))


def test_the_ranks_decide_together_and_all_run_the_wrong_versions():
    outcomes = []
    for ranks in ((0, 1), (0,)):
        with board_dir() as path:               # one board directory per launch
            outcomes.append(labkit.launch(_decide, ranks, path, world_size=2, timeout=60))
    right, wrong_on_one = outcomes
    assert right == [(True, ["checking", "running"], {})] * 2
    assert wrong_on_one == [(False, ["checking", "running"], {"double": 20, "triple": 30}),
                            (False, ["checking", "running"], {"double": 22, "triple": 33})]


# --- the Watch itself, on 2 processes -------------------------------------------------------------------------------

def _watched(board_path, mode):
    rank = torch.distributed.get_rank()
    watch = Watch(["all_reduce"], deadline=2.0, board=Board(board_path, rank, 2), defer=True)
    t = torch.full((3,), float(rank + 1))
    with watch.installed():
        watch.phase = "the test"
        if mode == "waited":
            torch.distributed.all_reduce(t, async_op=True).wait()
        elif mode == "never waited":
            torch.distributed.all_reduce(t, async_op=True)        # the result stays in the watch's copy
        elif mode == "rank 0 only":
            if rank == 0:
                torch.distributed.all_reduce(t)
        elif mode == "left open on rank 0":
            if rank == 0:
                torch.distributed.all_reduce(t, async_op=True)
    if mode != "rank 0 only":
        everyone(None, watch)
    watch.returned()
    return t.tolist(), [(c.op, c.async_op, len(c.waits)) for c in watch.calls]


def _watch_run(mode):
    with board_dir() as path:
        return run_on_ranks(_watched, path, mode, world_size=2, timeout=8, name="f")


def test_a_deferred_result_reaches_the_tensor_only_at_wait():
    assert _watch_run("waited") == [([3.0] * 3, [("all_reduce", True, 1)])] * 2
    assert _watch_run("never waited") == [([1.0] * 3, [("all_reduce", True, 0)]), ([2.0] * 3, [("all_reduce", True, 0)])]


def test_a_collective_on_one_rank_is_named_as_a_deadlock_with_every_ranks_state():
    with pytest.raises(CheckFailed) as info:
        _watch_run("rank 0 only")
    message = str(info.value)
    assert "rank 0" in message and "1st dist.all_reduce, during the test" in message
    assert "rank 1: had returned from its function" in message and "→ rank 1 has returned" in message


def test_a_collective_left_open_on_one_rank_is_named_before_the_checkers_gather():
    with pytest.raises(CheckFailed) as info:
        _watch_run("left open on rank 0")
    assert "the ranks made different numbers of torch.distributed calls during the test: rank 0 1 call and " \
           "rank 1 0 calls" in str(info.value)


def test_bound_prints_the_same_power_of_ten_for_rounding_differences_of_any_cpu():
    from labkit.checks.harness import bound
    # float64 rounding differences, which move with the CPU (lesson 8: 2e-14 to 8e-14): one printed bound
    assert {bound(x) for x in (0.0, 1e-16, 2e-14, 3e-14, 8e-14, 1e-12)} == {"1e-12"}
    assert (bound(2e-12), bound(0.003), bound(3e-14, floor=-14)) == ("1e-11", "1e-2", "1e-13")
