"""The checkers of exercise 9 accept the solution notebook's topk_hook, topk_bytes and break_even_ratio (and labkit's
own), and name every known-wrong version of their tables, each built from labkit's own code: no error feedback,
the residual reset, kept one step, added twice, aliased to the buffer, the top-k of g, indices not aligned, the sum
instead of the mean, a dense all-reduce...; the indices or the (N−1) forgotten in the bytes, the break-even ratio
against one copy of M... A wrong hook stops at the first world size (3), in one launch; a wrong formula in this
process, before any launch.

No `from __future__ import annotations` here: the hooks below are registered with torch's DDP, which compares their
return annotation with torch.futures.Future[torch.Tensor]."""

import math
import sys
from pathlib import Path

import cloudpickle
import pytest
from notebook_code import code_cells, imports_without_pyplot
import torch
import torch.distributed as dist

import labkit
from labkit import comm, compression_cost
from labkit.checks import CheckFailed
from labkit.checks.ex09 import (BREAK_EVEN_MISTAKES, BUCKETS, BYTES_MISTAKES, RATIO, STEPS, TOPK_MISTAKES,
                                check_topk_cost, check_topk_hook, fake_gradient, fake_run)
from labkit.checks.harness import literal_parts
from labkit.comm import all_gather_into_tensor
from labkit.compression import done, topk_hook

ROOT = Path(__file__).resolve().parents[1]
# the hooks below travel to the workers by value, as a notebook's do: the workers need not import this module
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _solution():
    """topk_hook, topk_bytes and break_even_ratio exactly as the solution notebook defines them."""
    code = code_cells(ROOT / "solutions" / "09_compression_exercise.ipynb")
    namespace = {"__name__": "__main__"}   # as in a notebook: its functions travel by value
    exec(compile(imports_without_pyplot(code[0]), "solution-imports", "exec"), namespace)
    for name in ("def topk_hook", "def topk_bytes"):
        exec(compile(next(s for s in code if name in s), name, "exec"), namespace)
    return namespace["topk_hook"], namespace["topk_bytes"], namespace["break_even_ratio"]


solution_hook, solution_bytes, solution_break_even = _solution()


def assert_named(check, *tested, says: str, **kwargs) -> str:
    """``check(*tested)`` raises CheckFailed whose message holds the fixed text of ``says``."""
    with pytest.raises(CheckFailed) as info:
        check(*tested, **kwargs)
    for text in literal_parts(says):
        assert text in str(info.value), str(info.value)
    return str(info.value)


# --------------------------------------------------------------------------------------------
# The solution passes, and so does labkit's own code
# --------------------------------------------------------------------------------------------

def test_the_solution_passes_both_checks(capsys):
    check_topk_hook(solution_hook)
    check_topk_cost(solution_bytes, solution_break_even)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" equals")[0].split(" and ")[0] for line in lines] == ["✓ topk_hook", "✓ topk_bytes"]
    assert "on 2, 3 and 4 processes" in lines[0] and "84, 168 and 252 bytes per rank" in lines[0]
    assert "sending 56880 bytes per rank instead of 1893120" in lines[0]
    assert "under torch's DistributedDataParallel it gives the parameters" in lines[0]
    assert lines[1].endswith("on at most 66 ranks")


def test_labkits_own_code_passes(capsys):
    check_topk_hook(topk_hook, world_sizes=(2,))
    check_topk_cost(compression_cost.topk_bytes, compression_cost.break_even_ratio)
    assert capsys.readouterr().out.count("✓") == 2


def packed_pairs(state, bucket) -> torch.futures.Future[torch.Tensor]:
    """A student's other design, right: (index, value) pairs packed in one float64 tensor, one all-gather (labkit.comm's
    function imported by name: still recorded, and not taken for a call of torch.distributed's own)."""
    p = bucket.buffer() + state.residual.get(bucket.index(), 0)
    k = math.ceil(state.ratio * p.numel())
    index = p.abs().topk(k, sorted=False).indices
    state.residual[bucket.index()] = p.clone().index_fill_(0, index, 0)
    pairs = torch.stack([index.double(), p[index].double()], dim=1)
    everyone = pairs.new_empty(dist.get_world_size() * k, 2)
    all_gather_into_tensor(everyone, pairs)
    out = torch.zeros_like(p).index_add_(0, everyone[:, 0].long(), everyone[:, 1].to(p.dtype))
    return done(out / dist.get_world_size())


def test_another_right_design_passes(capsys):
    check_topk_hook(packed_pairs, world_sizes=(3,))
    assert "✓ packed_pairs" in capsys.readouterr().out


def test_the_data_has_no_ties_and_a_residual_that_grows_until_sent():
    """At every call the k-th and (k+1)-th largest |g + e| differ by 1e-3 (top-k is unique), and some entry is owed
    for two steps or more before it is sent (what 'residual kept one step only' gets wrong)."""
    runs = labkit.launch(fake_run, topk_hook, world_size=4)
    sent_late = 0
    for r, steps in enumerate(runs):
        for b in range(len(BUCKETS)):
            M = sum(math.prod(shape) for _, shape in BUCKETS[b])
            k = compression_cost.topk_k(M, RATIO)
            owed, owed_for = torch.zeros(M), torch.zeros(M, dtype=torch.int64)
            for t in range(STEPS):
                sizes = (fake_gradient(t, b, r) + owed).abs().sort(descending=True).values
                assert sizes[k - 1] - sizes[k] > 1e-3, (r, t, b)
                owed = steps[t][b]["residual"]
                sent_late += int(((owed == 0) & (owed_for >= 2)).sum())     # owed two steps or more, now sent
                owed_for = torch.where(owed == 0, 0, owed_for + 1)
    assert sent_late > 0


# --------------------------------------------------------------------------------------------
# Every row of every table is named
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mistake", TOPK_MISTAKES, ids=[m.name for m in TOPK_MISTAKES])
def test_every_hook_mistake_is_named(mistake):
    message = assert_named(check_topk_hook, mistake.variant, says=mistake.says, world_sizes=(3,))
    assert "on 3 processes, step " in message


@pytest.mark.parametrize("mistake", BYTES_MISTAKES, ids=[m.name for m in BYTES_MISTAKES])
def test_every_bytes_mistake_is_named(mistake):
    def wrong(numel, ratio, world_size, value_bytes=4, index_bytes=8):
        return mistake.variant(numel, ratio, world_size, value_bytes, index_bytes)
    assert_named(check_topk_cost, wrong, compression_cost.break_even_ratio, says=mistake.says)


@pytest.mark.parametrize("mistake", BREAK_EVEN_MISTAKES, ids=[m.name for m in BREAK_EVEN_MISTAKES])
def test_every_break_even_mistake_is_named(mistake):
    def wrong(world_size, value_bytes=4, index_bytes=8):
        return mistake.variant(world_size, value_bytes, index_bytes)
    assert_named(check_topk_cost, compression_cost.topk_bytes, wrong, says=mistake.says)


def test_a_formula_of_no_known_kind_gets_the_derivation():
    message = assert_named(check_topk_cost, lambda numel, ratio, world_size, value_bytes=4, index_bytes=8: 7,
                           compression_cost.break_even_ratio, says="")
    assert "(1000, 0.01, 4, value_bytes=4, index_bytes=8) is 7, expected 360. " in message
    assert "(N−1)·k·(v + i) per rank" in message


# --------------------------------------------------------------------------------------------
# Unfinished, unusable and unusual hooks
# --------------------------------------------------------------------------------------------

def stub(state, bucket) -> torch.futures.Future[torch.Tensor]:
    raise NotImplementedError("Exercise 9a: add the residual, send the top-k values and indices; see the instructions")


def test_stubs_read_as_unfinished_with_every_piece_named():
    with pytest.raises(NotImplementedError, match=r"^Exercise 9a"):
        check_topk_hook(stub, world_sizes=(2,))

    def raising(task):
        def fn(*args, **kwargs):
            raise NotImplementedError(f"Exercise {task}: see the instructions above")
        return fn
    with pytest.raises(NotImplementedError) as info:
        check_topk_cost(raising("9b(i)"), raising("9b(ii)"))
    assert str(info.value).startswith("Exercise 9b(i)") and "9b(ii)" in str(info.value)


def test_a_signature_torch_refuses_is_named_before_any_launch():
    def hook(state, b) -> torch.futures.Future[torch.Tensor]:
        return topk_hook(state, b)
    assert_named(check_topk_hook, hook, says="a communication hook takes (state, bucket), and torch's DDP looks its "
                                             "second parameter up by the name `bucket`")

    def postponed(state, bucket) -> "torch.futures.Future[torch.Tensor]":
        return topk_hook(state, bucket)
    assert_named(check_topk_hook, postponed, says="`from __future__ import annotations`")

    def tensor_annotated(state, bucket) -> torch.Tensor:
        return topk_hook(state, bucket)
    assert_named(check_topk_hook, tensor_annotated, says="torch's DDP accepts a hook annotated -> torch.futures.Future")


def returns_none(state, bucket) -> torch.futures.Future[torch.Tensor]:
    topk_hook(state, bucket)


def returns_values(state, bucket) -> torch.futures.Future[torch.Tensor]:
    return done(topk_hook(state, bucket).wait()[:3])


def gathers_objects(state, bucket) -> torch.futures.Future[torch.Tensor]:
    comm.all_gather_objects(bucket.index())
    return topk_hook(state, bucket)


def calls_torch_itself(state, bucket) -> torch.futures.Future[torch.Tensor]:
    dist.all_reduce(torch.zeros(1))
    return topk_hook(state, bucket)


def raises(state, bucket) -> torch.futures.Future[torch.Tensor]:
    raise ValueError("no idea")


@pytest.mark.parametrize("hook, says", [
    (returns_none, "your hook returned None, not a torch.futures.Future: return a torch.futures.Future holding the "
                   "averaged bucket"),
    (returns_values, "the future holds a tensor of shape (3,): it must hold the whole averaged bucket"),
    (gathers_objects, "your hook sent with comm.all_gather_objects: send tensors through labkit.comm"),
    (calls_torch_itself, "your hook sent with dist.all_reduce: send tensors through labkit.comm"),
    (raises, "raises raised ValueError on rank "),
], ids=["returns None", "returns the values", "pickled objects", "torch.distributed itself", "raises"])
def test_unusual_hooks_are_described(hook, says):
    assert_named(check_topk_hook, hook, says=says, world_sizes=(3,))
