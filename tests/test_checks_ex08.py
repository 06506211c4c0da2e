"""The checkers of exercise 8 accept the solution notebook's Zero1, MyUnit and zero_bytes_per_rank, and name every
known-wrong version of their tables, each built from labkit's own code: a shard that misses or repeats parameters
or belongs to another rank, a sum instead of the mean, no all-gather after the step, the optimizer state not
sharded...; a unit never freed (caught by the memory check), the whole gradients kept, an all-gather into a freed
buffer...; the parameters sharded at stage 1, the master weights forgotten, 2Ψ at stage 3... A wrong class stops at
the first world size (3), in one launch; a wrong formula in this process, before any launch."""

from pathlib import Path

import pytest
from notebook_code import code_cells, imports_without_pyplot
import torch

from labkit import comm
from labkit.checks import CheckFailed
from labkit.checks.ex08 import (BYTES_MISTAKES, UNIT_MISTAKES, ZERO_MISTAKES, check_fsdp_unit, check_zero1,
                                check_zero_bytes, wrong_unit, wrong_zero, zero_bytes_reference)
from labkit.checks.harness import literal_parts
from labkit.fsdp import Unit
from labkit.zero import ZeroOptimizer

ROOT = Path(__file__).resolve().parents[1]


def _solution():
    """Zero1, MyUnit and zero_bytes_per_rank exactly as the solution notebook defines them."""
    code = code_cells(ROOT / "solutions" / "08_zero_fsdp_exercise.ipynb")
    namespace = {"__name__": "__main__"}   # as in a notebook: its classes travel by value
    exec(compile(imports_without_pyplot(code[0]), "solution-imports", "exec"), namespace)
    for name in ("class Zero1", "class MyUnit", "def zero_bytes_per_rank"):
        exec(compile(next(s for s in code if name in s), name, "exec"), namespace)
    return namespace["Zero1"], namespace["MyUnit"], namespace["zero_bytes_per_rank"]


Zero1, MyUnit, zero_bytes_per_rank = _solution()


def assert_named(check, tested, says: str, **kwargs) -> str:
    """``check(tested)`` raises CheckFailed whose message holds the fixed text of ``says``."""
    with pytest.raises(CheckFailed) as info:
        check(tested, **kwargs)
    for text in literal_parts(says):
        assert text in str(info.value), str(info.value)
    return str(info.value)


# --------------------------------------------------------------------------------------------
# The solution passes, and so do labkit's own classes
# --------------------------------------------------------------------------------------------

def test_the_solution_passes_the_three_checks(capsys):
    check_zero1(Zero1)
    check_fsdp_unit(MyUnit)
    check_zero_bytes(zero_bytes_per_rank)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" (")[0].split(" matches")[0].split(" equals")[0] for line in lines] == [
        "✓ Zero1", "✓ MyUnit", "✓ zero_bytes_per_rank"]
    assert "on 2, 3 and 4 processes" in lines[0] and "each rank keeps 1/N of the optimizer state" in lines[0]
    assert "torch's fully_shard on 3" in lines[1] and "13296 of 13296 on 3" in lines[1]
    assert "120 GB, 31.4 GB, 16.6 GB, 1.88 GB" in lines[2]


def test_labkits_own_classes_pass(capsys):
    check_zero1(ZeroOptimizer, world_sizes=(2,))
    check_fsdp_unit(Unit, world_sizes=(2,))
    assert capsys.readouterr().out.count("✓") == 2


# --------------------------------------------------------------------------------------------
# Every row of every table is named
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mistake", ZERO_MISTAKES, ids=[m.name for m in ZERO_MISTAKES])
def test_every_zero1_mistake_is_named(mistake):
    assert_named(check_zero1, wrong_zero(mistake), mistake.says, world_sizes=(3,))


def test_the_other_wrong_owner_is_named_with_its_chunk():
    owner = next(m for m in ZERO_MISTAKES if m.name == "wrong owner")

    def next_rank(self, bucket):
        flat = bucket.flat([p.detach() for p in bucket.params], self.world_size)
        start = (self.rank + 1) % self.world_size * bucket.chunk
        return flat[start:start + bucket.chunk].clone()
    message = assert_named(check_zero1, type("NextRank", (ZeroOptimizer,), {"shard": next_rank}), owner.says,
                           world_sizes=(3,))
    assert "rank 0 keeps chunk 1 (elements [23, 46))" in message


@pytest.mark.parametrize("mistake", UNIT_MISTAKES, ids=[m.name for m in UNIT_MISTAKES])
def test_every_unit_mistake_is_named(mistake):
    message = assert_named(check_fsdp_unit, wrong_unit(mistake), mistake.says, world_sizes=(3,))
    if mistake.name == "never freed":   # named by the memory check: the peak against the prediction
        assert "13296 (the root and one block" in message


@pytest.mark.parametrize("mistake", BYTES_MISTAKES, ids=[m.name for m in BYTES_MISTAKES])
def test_every_bytes_mistake_is_named(mistake):
    def wrong(psi, n, stage, mixed_precision=True):
        return mistake.variant(zero_bytes_reference(psi, n, stage, mixed_precision), psi, n, stage, mixed_precision)
    assert_named(check_zero_bytes, wrong, mistake.says)


def test_a_formula_with_two_mistakes_names_the_kind_and_what_it_should_be():
    def two(psi, n, stage, mixed_precision=True):
        out = zero_bytes_per_rank(psi, n, stage, mixed_precision)
        return dict(out, optimizer=out["optimizer"] * 3 / 2 + 1, sent=0)
    message = assert_named(check_zero_bytes, two, "")
    assert "['optimizer'] is 90000000001, expected 60000000000" in message and "Adam's m and v, 2 · 4 bytes" in message


def test_a_wrong_return_value_is_described():
    assert_named(check_zero_bytes, lambda psi, n, stage, mixed_precision=True: [1, 2], "returned a list, [1, 2]: "
                 "return a dict with the keys parameters, gradients, optimizer, master, sent")


class Float32Chunks(ZeroOptimizer):
    """A step whose chunk of the gradients is torch.empty(c): float32, for float64 gradients."""

    @torch.no_grad()
    def step(self):
        for bucket in self.buckets:
            out = torch.empty(bucket.chunk)
            comm.reduce_scatter_tensor(out, bucket.flat([p.grad for p in bucket.params], self.world_size))
            bucket.master.grad = out
        self.optimizer.step()


def test_a_collective_between_dtypes_is_named_before_gloo_aborts():
    assert_named(check_zero1, Float32Chunks, "a reduce-scatter from torch.float64 into torch.float32: its output "
                 "must have its input's dtype", world_sizes=(3,))


# --------------------------------------------------------------------------------------------
# Unfinished and unusable
# --------------------------------------------------------------------------------------------

def _stub(task):
    def method(self, *args):
        raise NotImplementedError(f"Exercise {task}: see the instructions above")
    return method


def test_stubs_read_as_unfinished_with_every_piece_named():
    with pytest.raises(NotImplementedError, match=r"^Exercise 8a\(ii\)") as info:
        check_zero1(type("Zero1", (ZeroOptimizer,), {"step": _stub("8a(ii)")}), world_sizes=(2,))
    assert "Not written yet" not in str(info.value)
    with pytest.raises(NotImplementedError) as info:
        check_fsdp_unit(type("MyUnit", (Unit,), {m: _stub(t) for m, t in (
            ("gather", "8b(i)"), ("free", "8b(ii)"), ("reduce_scatter_grads", "8b(iii)"))}), world_sizes=(2,))
    assert str(info.value).startswith("Exercise 8b(i)") and "8b(ii)" in str(info.value) and "8b(iii)" in str(info.value)
    with pytest.raises(NotImplementedError, match=r"^Exercise 8c"):
        check_zero_bytes(lambda psi, n, stage, mixed_precision=True: _stub("8c")(None))


def test_an_exception_names_the_rank_and_a_class_of_the_wrong_kind_is_refused():
    def broken(self):
        raise ValueError("no idea")
    message = assert_named(check_zero1, type("Zero1", (ZeroOptimizer,), {"step": broken}), "", world_sizes=(2,))
    assert "Zero1.step raised ValueError on rank " in message and " at step 1: no idea" in message
    assert_named(check_fsdp_unit, ZeroOptimizer, "check_fsdp_unit needs your class, a subclass of labkit.fsdp.Unit")
    assert_named(check_zero1, torch.optim.AdamW, "check_zero1 needs your class, a subclass of labkit.zero")
