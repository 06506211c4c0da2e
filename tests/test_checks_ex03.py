"""The checkers of exercise 3 accept the solution notebook's BucketedDDP and reject each known-wrong version
with a message that names the mistake: no division by N (with the factor measured), waiting on the wrong
handle (the bucket never waited on is named), buckets in registration order (no overlap with backward), no
broadcast at wrap time (rank r's weights differ from rank 0's), and more. A wrong version stops at the
first world size (3), in one launch; the solution runs on every default world size."""

import functools
from pathlib import Path

import pytest
from notebook_code import code_cells, imports_without_pyplot
import torch
import torch.distributed as dist

from labkit import comm
from labkit.checks import CheckFailed
from labkit.checks.ex03 import (MISTAKES, check_broadcast, check_bucket_plan, check_bucketed_ddp,
                                check_finish_backward, check_on_grad_ready, wrong_version)
from labkit.checks.harness import literal_parts
from labkit.ddp import BucketedDDP as LabkitBucketedDDP

ROOT = Path(__file__).resolve().parents[1]


def _solution_class():
    """BucketedDDP exactly as the solution notebook defines it (its import cell, then its class cell)."""
    code = code_cells(ROOT / "solutions" / "03_ddp_exercise.ipynb")
    namespace = {"__name__": "__main__"}   # as in a notebook: its functions and classes travel by value
    exec(compile(imports_without_pyplot(code[0]), "solution-imports", "exec"), namespace)
    exec(compile(next(s for s in code if s.startswith("class BucketedDDP")), "solution-class", "exec"), namespace)
    return namespace["BucketedDDP"]


BucketedDDP = _solution_class()


def assert_rejected(check, cls, expected, **kwargs):
    """``check(cls)`` raises CheckFailed, and its message contains every text of ``expected``."""
    with pytest.raises(CheckFailed) as info:
        check(cls, **kwargs)
    for text in expected:
        assert text in str(info.value), str(info.value)
    return str(info.value)


# --------------------------------------------------------------------------------------------
# The solution passes
# --------------------------------------------------------------------------------------------

def test_the_solution_passes_every_check(capsys):
    for check in (check_broadcast, check_bucket_plan, check_on_grad_ready, check_finish_backward, check_bucketed_ddp):
        check(BucketedDDP)
    assert capsys.readouterr().out.split("\n") == [
        "✓ BucketedDDP.broadcast_from_rank0 is correct: on 3 processes whose models started from different seeds, "
        "every rank holds rank 0's parameters (the frozen ones too) and buffers after the wrap",
        "✓ BucketedDDP.bucket_plan is correct on 3 processes (1 bucket, 2 buckets, 1 parameter per bucket): every "
        "trainable parameter in one bucket, within the cap, and with several buckets the first all-reduce starts "
        "while backward is still running",
        "✓ BucketedDDP.on_grad_ready is correct on 3 processes (1 bucket, 2 buckets, 1 parameter per bucket): each "
        "bucket launched once, in bucket order, asynchronously, divided by N, during backward",
        "✓ BucketedDDP.finish_backward is correct on 3 processes (1 bucket, 2 buckets, 1 parameter per bucket): "
        "every bucket's own handle waited on, and the averaged gradients copied back into .grad",
        "✓ BucketedDDP matches torch's DistributedDataParallel on 2, 3 and 4 processes, with 1 bucket, 2 buckets, "
        "1 parameter per bucket: the same weights after the wrap, the same gradients after each of 3 SGD steps, "
        "the parameters within 1e-12 of torch's; the all-reduces launched in bucket order during backward and "
        "each one waited on",
        ""]


def test_labkits_class_that_the_task_checks_mix_in_passes_on_its_own(capsys):
    check_bucketed_ddp(LabkitBucketedDDP, world_sizes=(2,))
    assert capsys.readouterr().out.startswith("✓ BucketedDDP matches torch's DistributedDataParallel on 2 "
                                              "processes")


# --------------------------------------------------------------------------------------------
# The table of known mistakes: every row is built from labkit's class and named by its task's check
# --------------------------------------------------------------------------------------------

CHECKS = {"3a": check_broadcast, "3b": check_bucket_plan, "3c": check_on_grad_ready, "3d": check_finish_backward}
HEADS = {"3a": "broadcast_from_rank0 is wrong", "3b": "bucket_plan is wrong", "3c": "on_grad_ready is wrong",
         "3d": "finish_backward is wrong"}


@pytest.mark.parametrize("mistake", [m for m in MISTAKES if m.variant], ids=lambda m: m.name)
def test_every_mistake_of_the_table_is_named_by_its_tasks_check(mistake):
    wrong = wrong_version(mistake)
    message = assert_rejected(CHECKS[mistake.variant.task], wrong, literal_parts(mistake.says))
    assert message.startswith(f"{wrong.__name__}.{HEADS[mistake.variant.task]} ("), message


class LaunchedAsTheyFill(LabkitBucketedDDP):
    """3c launches each bucket when it fills, not in index order (cannot be written as a change of labkit's)."""

    def on_grad_ready(self, param):
        index, offset = self.bucket_of[param]
        bucket = self.buckets[index]
        bucket.buffer[offset:offset + param.numel()].copy_(param.grad.reshape(-1))
        bucket.ready += 1
        if bucket.ready == len(bucket.params):
            bucket.buffer.div_(self.world_size)
            bucket.work = dist.all_reduce(bucket.buffer, async_op=True)


class IfNotWhile(LabkitBucketedDDP):
    """3c with `if` where the skeleton has `while`: a gradient that completes several buckets launches one."""

    def on_grad_ready(self, param):
        index, offset = self.bucket_of[param]
        self.buckets[index].buffer[offset:offset + param.numel()].copy_(param.grad.reshape(-1))
        self.buckets[index].ready += 1
        full = self.buckets[self.next_to_launch] if self.next_to_launch < len(self.buckets) else None
        if full is not None and full.ready == len(full.params):
            full.buffer.div_(self.world_size)
            full.work = dist.all_reduce(full.buffer, async_op=True)
            self.next_to_launch += 1


class ExtraAllReduceOnRank0(LabkitBucketedDDP):
    """3d: rank 0 launches one more all-reduce after the others, and never waits for it."""

    def finish_backward(self):
        super().finish_backward()
        if dist.get_rank() == 0:
            self.extra = dist.all_reduce(torch.zeros(1, dtype=torch.float64), async_op=True)


# the table's rows that are not a change of one method of labkit's class: a class of this file each
BY_HAND = {"launched as they fill": (LaunchedAsTheyFill, check_on_grad_ready),
           "bucket never launched": (IfNotWhile, check_on_grad_ready),
           "all-reduce counts differ": (ExtraAllReduceOnRank0, check_finish_backward)}


def test_every_row_of_the_table_is_tried():
    assert {m.name for m in MISTAKES if m.variant is None} == set(BY_HAND)
    assert len({m.name for m in MISTAKES}) == len(MISTAKES)
    assert all(m.variant.task in CHECKS for m in MISTAKES if m.variant)


@pytest.mark.parametrize("name", sorted(BY_HAND))
def test_the_rows_written_by_hand_are_named(name):
    wrong, check = BY_HAND[name]
    says = next(m.says for m in MISTAKES if m.name == name)
    assert_rejected(check, wrong, literal_parts(says))


# --------------------------------------------------------------------------------------------
# The four known-wrong versions of the brief, by the whole check (exact texts)
# --------------------------------------------------------------------------------------------

def row(name):
    return wrong_version(next(m for m in MISTAKES if m.name == name))


class SameHandleEveryTime(BucketedDDP):
    """3c keeps one handle for all buckets (the last one launched); 3d waits on it once per bucket."""

    def on_grad_ready(self, param):
        index, offset = self.bucket_of[param]
        bucket = self.buckets[index]
        bucket.buffer[offset:offset + param.numel()].copy_(param.grad.reshape(-1))
        bucket.ready += 1
        while (self.next_to_launch < len(self.buckets)
               and self.buckets[self.next_to_launch].ready == len(self.buckets[self.next_to_launch].params)):
            full = self.buckets[self.next_to_launch]
            full.buffer.div_(self.world_size)
            self.work = dist.all_reduce(full.buffer, async_op=True)
            self.next_to_launch += 1

    def finish_backward(self):
        for bucket in self.buckets:
            self.work.wait()
            for p, offset in zip(bucket.params, bucket.offsets):
                p.grad.copy_(bucket.buffer[offset:offset + p.numel()].view_as(p.grad))


NO_DIVISION = ["(N=3 ranks, bucket_cap_mb=1 (1 bucket)), in the first backward: every gradient is 3 times the "
               "average, on every rank (measured: p.grad / torch DDP's p.grad = 3 = N)",
               "the average is g = (1/N) Σ g_i: divide each bucket by the world size"]
WRONG_HANDLE = ["(N=3 ranks, bucket_cap_mb=0.000858 (2 buckets)), in the first backward: on rank 0, the all-reduce "
                "of bucket 0 (hidden.bias, hidden.weight, out.bias, out.weight) was launched, but its handle was "
                "never waited on before backward returned",
                "so bucket 0 still holds rank 0's own gradients / N",
                "in finish_backward wait on every bucket's handle"]
REGISTRATION_ORDER = ["(N=3 ranks, bucket_cap_mb=0.000858 (2 buckets)), in the first backward: no all-reduce started "
                      "before backward had produced every gradient: bucket 0 holds emb.weight, and emb.weight's "
                      "gradient is ready last (the gradients became ready in the order out.bias, out.weight, "
                      "hidden.bias, hidden.weight, emb.weight)", "no communication overlaps the backward pass",
                      "plan_buckets(reversed(self.params), self.bucket_cap_bytes)"]
NO_BROADCAST = ["(N=3 ranks, bucket_cap_mb=1 (1 bucket)): after wrapping, rank 1's initial weights differ from "
                "rank 0's: emb.weight[0, 0] is ", " on rank 0 and ", " on rank 1. Every rank built its model with "
                "its own seed", "Nothing was copied", "dist.broadcast(t, src=0)"]


@pytest.mark.parametrize("wrong,expected", [
    ("no division", ["NoDivision is wrong "] + NO_DIVISION),
    ("handle never waited", ["HandleNeverWaited is wrong "] + WRONG_HANDLE +
     ["(the handles waited on were those of bucket 1)"]),
    ("registration order", ["RegistrationOrder is wrong "] + REGISTRATION_ORDER),
    ("no broadcast", ["NoBroadcast is wrong "] + NO_BROADCAST),
    ("frozen parameter planned", ["FrozenParameterPlanned.bucket_plan is wrong (N=3 ranks, bucket_cap_mb=1 (1 bucket)): "
                                  "bucket 0 holds frozen.bias, a frozen parameter (requires_grad=False)"]),
    ("buffers not broadcast", ["The parameters agree, but the buffer scale (self.module.buffers()) did not arrive"]),
    ("frozen parameters not broadcast", ["rank 1's initial weights differ from rank 0's: frozen.weight[0, 0]",
                                         "The trainable parameters agree, but frozen.weight, frozen.bias, scale differ",
                                         "not self.params", "and the buffers (self.module.buffers())."]),
    ("broadcast with autograd", ["PyTorch warned on rank 0: \"c10d::broadcast_: an autograd kernel was not registered",
                                 "Broadcast under torch.no_grad()"]),
    ("waited in the hook", ["(2 buckets)), in the first backward: on rank 0, the all-reduce of bucket 0 (hidden.bias, "
                            "hidden.weight, out.bias, out.weight) was waited on during the backward pass, when only 4 "
                            "of the 5 gradients were ready"]),
    ("launched at the end", ["(2 buckets)), in the first backward: no all-reduce started before backward had produced "
                             "every gradient (the first, of bucket 0 (hidden.bias, hidden.weight, out.bias, "
                             "out.weight), started after all 5 were ready)",
                             "Launch each bucket from on_grad_ready as soon as it is full"]),
    ("copied before the wait", ["emb.weight.grad is rank 0's own gradient divided by N",
                                "only after its handle's wait()"]),
    ("never copied back", ["emb.weight.grad is rank 0's own gradient (in bucket 0 (", "), not the average"]),
    ("wrong slice", ["on rank 0, emb.weight.grad[0, 0] is ", "at its own offset"]),
], ids=lambda x: x if isinstance(x, str) else None)
def test_the_whole_check_names_the_mistakes_too(wrong, expected):
    assert_rejected(check_bucketed_ddp, row(wrong), expected)


def test_the_brief_mistakes_in_the_solutions_own_code():
    assert_rejected(check_bucketed_ddp, SameHandleEveryTime, ["SameHandleEveryTime is wrong "] + WRONG_HANDLE +
                    ["(the handles waited on were those of bucket 1 (2 times))"])


def test_a_missing_wait_gives_the_same_diagnosis_on_every_run():
    wrong = row("handle never waited")
    first = assert_rejected(check_finish_backward, wrong, WRONG_HANDLE)
    assert assert_rejected(check_finish_backward, wrong, WRONG_HANDLE) == first


class Synchronous(BucketedDDP):
    """The whole class synchronous: on_grad_ready all-reduces without async_op, finish_backward only copies."""

    def on_grad_ready(self, param):
        index, offset = self.bucket_of[param]
        bucket = self.buckets[index]
        bucket.buffer[offset:offset + param.numel()].copy_(param.grad.reshape(-1))
        bucket.ready += 1
        while (self.next_to_launch < len(self.buckets)
               and self.buckets[self.next_to_launch].ready == len(self.buckets[self.next_to_launch].params)):
            self.buckets[self.next_to_launch].buffer.div_(self.world_size)
            dist.all_reduce(self.buckets[self.next_to_launch].buffer)
            self.next_to_launch += 1

    def finish_backward(self):
        for bucket in self.buckets:
            for p, offset in zip(bucket.params, bucket.offsets):
                p.grad.copy_(bucket.buffer[offset:offset + p.numel()].view_as(p.grad))


def test_a_synchronous_class_is_named():
    assert_rejected(check_bucketed_ddp, Synchronous, [
        "rank 0 called dist.all_reduce for bucket 0 (hidden.bias, hidden.weight, out.bias, out.weight, emb.weight) "
        "without async_op=True"])


def test_a_loop_bug_in_the_hook_is_blamed_on_the_hook_not_on_finish_backward():
    for check, head in ((check_on_grad_ready, "IfNotWhile.on_grad_ready is wrong"), (check_bucketed_ddp, "IfNotWhile is wrong")):
        message = assert_rejected(check, IfNotWhile, [
            head + " (N=3 ranks, bucket_cap_mb=1e-09 (1 parameter per bucket)), in the first backward: bucket 3 "
            "(out.weight) was never all-reduced (the all-reduces launched were, in order, of buckets [0, 1, 2])",
            "a `while`, not an `if`"])
        assert "AttributeError" not in message


def test_exceptions_caused_by_the_hooks_state_are_blamed_on_the_hook():
    message = assert_rejected(check_on_grad_ready, row("handle not kept"), [
        "HandleNotKept.on_grad_ready is wrong (N=3 ranks, bucket_cap_mb=1 (1 bucket)), in the first backward: on rank "
        "0, bucket 0 (hidden.bias, hidden.weight, out.bias, out.weight, emb.weight) was launched, but when backward "
        "ended bucket.work was None"])
    assert "--- traceback" not in message and " raised AttributeError on rank" not in message
    assert_rejected(check_on_grad_ready, row("gradient cleared"), [
        "GradientCleared.on_grad_ready is wrong", "on_grad_ready raised AttributeError ('NoneType' object has no "
        "attribute 'reshape') on rank 0, because out.bias.grad was None by then", "zero_grad()"])
    assert_rejected(check_bucket_plan, row("empty bucket"), [
        "EmptyBucket.bucket_plan is wrong (N=3 ranks, bucket_cap_mb=1 (1 bucket)): bucket 1 is empty"])


def _averaging_all_reduce(cls):
    """``cls`` whose all-reduces pass op=ReduceOp.AVG (the rest of its code unchanged)."""
    class Averaging(cls):
        def on_grad_ready(self, param):
            # during a check both are the check's recording all-reduce; labkit's class calls comm's
            watched, via_comm = dist.all_reduce, comm.all_reduce
            dist.all_reduce = functools.partial(watched, op=dist.ReduceOp.AVG)
            comm.all_reduce = functools.partial(via_comm, op=dist.ReduceOp.AVG)
            try:
                super().on_grad_ready(param)
            finally:
                dist.all_reduce, comm.all_reduce = watched, via_comm
    Averaging.__name__ = f"Averaging{cls.__name__}"
    return Averaging


def test_reduce_op_avg_is_an_average_as_in_exercise_1(capsys):
    """One rule set across the exercises: ReduceOp.AVG without dividing is accepted (exercise 1 accepts it)."""
    check_on_grad_ready(_averaging_all_reduce(row("no division")))
    assert capsys.readouterr().out.startswith("✓ AveragingNoDivision.on_grad_ready is correct")
    assert_rejected(check_on_grad_ready, _averaging_all_reduce(BucketedDDP), [
        "is 1/3 of the average", "op=ReduceOp.AVG already divides by N"])


# --------------------------------------------------------------------------------------------
# Exceptions, hangs, stubs, bad arguments
# --------------------------------------------------------------------------------------------

class RaisesOnRank1(BucketedDDP):
    def on_grad_ready(self, param):
        if dist.get_rank() == 1:
            raise ValueError("deliberate mistake on rank 1")
        super().on_grad_ready(param)


class EndlessOnRank2(BucketedDDP):
    def on_grad_ready(self, param):
        bucket = self.buckets[self.bucket_of[param][0]]
        while dist.get_rank() == 2 and bucket.ready < len(bucket.params):
            pass  # waits for the bucket to fill: but this very gradient is the one it waits for
        super().on_grad_ready(param)


class Rank0SkipsTheLastBucket(BucketedDDP):
    def on_grad_ready(self, param):
        index, offset = self.bucket_of[param]
        bucket = self.buckets[index]
        bucket.buffer[offset:offset + param.numel()].copy_(param.grad.reshape(-1))
        bucket.ready += 1
        while (self.next_to_launch < len(self.buckets)
               and self.buckets[self.next_to_launch].ready == len(self.buckets[self.next_to_launch].params)):
            full = self.buckets[self.next_to_launch]
            full.buffer.div_(self.world_size)
            if not (dist.get_rank() == 0 and self.next_to_launch == len(self.buckets) - 1):
                full.work = dist.all_reduce(full.buffer, async_op=True)
            self.next_to_launch += 1

    def finish_backward(self):
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()


class Stubs(BucketedDDP):
    """The exercise notebook as handed out."""

    def broadcast_from_rank0(self):
        raise NotImplementedError("Exercise 3a: broadcast rank 0's parameters; see the instructions above")

    def bucket_plan(self):
        raise NotImplementedError("Exercise 3b: return self.params cut into buckets; see the instructions above")

    def on_grad_ready(self, param):
        raise NotImplementedError("Exercise 3c: copy the gradient into its bucket; see the instructions above")

    def finish_backward(self):
        raise NotImplementedError("Exercise 3d: wait on each bucket's own handle; see the instructions above")


class BareNotImplemented(BucketedDDP):
    def on_grad_ready(self, param):
        raise NotImplementedError


def test_an_exception_is_reported_with_that_ranks_traceback():
    with pytest.raises(CheckFailed) as info:
        check_bucketed_ddp(RaisesOnRank1)
    message = str(info.value)
    assert message.startswith("RaisesOnRank1 raised ValueError on rank 1 (world size 3): deliberate mistake")
    assert 'in on_grad_ready\n    raise ValueError("deliberate mistake on rank 1")' in message
    assert "labkit/checks/ex03.py" not in message


def test_an_endless_loop_on_one_rank_is_stopped_and_named():
    with pytest.raises(CheckFailed) as info:
        check_bucketed_ddp(EndlessOnRank2, timeout=3)
    message = str(info.value)
    assert message.startswith("loss.backward() with EndlessOnRank2 did not return within 1.8 s on rank 2 (N=3 ranks): "
                              "an endless loop?"), message
    assert "--- where rank 2 was ---" in message and "in on_grad_ready" in message
    assert "What every rank was doing:\n  rank 0: waiting in its 1st dist.all_reduce, during backward 1" in message
    assert "rank 2: running its own code" in message


def _assert_deadlock(message, waiting, finished):
    assert "and the other side never came: the run is deadlocked, and the check stopped it." in message, message
    assert "What every rank was doing:" in message
    assert f"rank {waiting}: waiting in its " in message
    assert f"rank {finished}: had finished its part and was waiting for the others in the check" in message
    assert "every rank must launch the same all-reduces (one per bucket), in the same order" in message


def test_a_skipped_all_reduce_is_named_as_a_deadlock():
    with pytest.raises(CheckFailed) as info:
        check_bucketed_ddp(Rank0SkipsTheLastBucket, timeout=3)
    message = str(info.value)
    assert message.startswith(("rank 1 waited 2.4 s in its 1st dist.all_reduce, during backward 1 (N=3 ranks, "
                               "bucket_cap_mb=1 (1 bucket))", "rank 2 waited 2.4 s")), message
    _assert_deadlock(message, waiting=1, finished=0)
    assert "→ rank 0 had finished this step after 0 all-reduce(s)" in message


class SynchronousOnRank0(BucketedDDP):
    """Rank 0 also all-reduces each full bucket synchronously, in the hook: one all-reduce more than the others."""

    def on_grad_ready(self, param):
        launched = self.next_to_launch
        super().on_grad_ready(param)
        if dist.get_rank() == 0 and self.next_to_launch > launched:
            dist.all_reduce(self.buckets[launched].buffer)


def test_a_synchronous_all_reduce_on_only_some_ranks_is_named_as_a_deadlock():
    with pytest.raises(CheckFailed) as info:
        check_on_grad_ready(SynchronousOnRank0, timeout=3)
    message = str(info.value)
    assert message.startswith("rank 0 waited 2.4 s in its 2nd dist.all_reduce, during backward 1"), message
    _assert_deadlock(message, waiting=0, finished=1)
    assert "--- where rank 0 was ---" in message and "in on_grad_ready" in message


@pytest.mark.parametrize("check,task", [(check_broadcast, "3a"), (check_bucket_plan, "3b"),
                                        (check_on_grad_ready, "3c"), (check_finish_backward, "3d"),
                                        (check_bucketed_ddp, "3a")])
def test_each_unfinished_stub_is_reported_as_itself(check, task):
    with pytest.raises(NotImplementedError, match=f"^Exercise {task}: "):
        check(Stubs)


def test_a_bare_not_implemented_error_names_the_exercise():
    with pytest.raises(NotImplementedError, match=r"^Exercise 3c: BareNotImplemented.on_grad_ready is not written "
                                                  r"yet \(it raised NotImplementedError\)"):
        check_on_grad_ready(BareNotImplemented)


def test_bad_arguments_are_named_without_starting_processes():
    with pytest.raises(CheckFailed, match=r"pass your class itself \(e.g. check_bucketed_ddp\(BucketedDDP\)\), "
                                          r"not a str object"):
        check_bucketed_ddp("BucketedDDP")

    class OwnDesign:
        def __init__(self, module, bucket_cap_mb=25.0):
            self.module = module

    with pytest.raises(CheckFailed, match="OwnDesign has no method broadcast_from_rank0, bucket_plan, on_grad_ready, "
                                          "finish_backward: the check of exercise 3c runs your on_grad_ready inside "
                                          r"labkit.ddp.BucketedDDP"):
        check_on_grad_ready(OwnDesign)

    class OwnSkeleton:   # the four methods, but not in labkit's class: labkit's versions would not fit
        def __init__(self, module, bucket_cap_mb=25.0):
            self.module = module
        broadcast_from_rank0 = bucket_plan = on_grad_ready = finish_backward = lambda self, *a: None

    with pytest.raises(CheckFailed, match=r"OwnSkeleton is not a subclass of labkit.ddp.BucketedDDP: .*"
                                          r"class BucketedDDP\(labkit.ddp.BucketedDDP\)"):
        check_finish_backward(OwnSkeleton)


# --------------------------------------------------------------------------------------------
# 3e: choosing the buckets from labkit.bucket_model, checked against the best split (in this process)
# --------------------------------------------------------------------------------------------

import itertools  # noqa: E402
import math  # noqa: E402

from labkit import bucket_model  # noqa: E402
from labkit.checks.ex03 import CHOOSE_CASES, CHOOSE_MISTAKES, CHOOSE_TOLERANCE, check_choose_buckets  # noqa: E402
from labkit.ddp import plan_buckets  # noqa: E402


def _solution_choose_buckets():
    code = code_cells(ROOT / "solutions" / "03_ddp_exercise.ipynb")
    namespace = {"__name__": "__main__"}
    exec(compile("import math", "imports", "exec"), namespace)
    exec(compile(next(c for c in code if "def choose_buckets" in c), "3e", "exec"), namespace)
    return namespace["choose_buckets"]


choose_buckets = _solution_choose_buckets()


def _case(name):
    return next(c for c in CHOOSE_CASES if c.name == name)


def _args(case):
    return list(case.sizes), list(case.ready), case.alpha, case.beta


def assert_choice_rejected(fn, expected):
    with pytest.raises(CheckFailed) as info:
        check_choose_buckets(fn)
    for text in expected:
        assert text in str(info.value), str(info.value)
    return str(info.value)


def test_the_model_times_a_plan_by_hand():
    # two gradients of 100 and 300 bytes, ready at 1 and 2 (index 1 first); α = 0.5, β = 0.01
    sizes, ready = [300, 100], [2.0, 1.0]
    assert bucket_model.bucket_times([[1], [0]], sizes, ready, 0.5, 0.01) == [(1.0, 2.5), (2.5, 6.0)]
    assert bucket_model.bucket_times([[0, 1]], sizes, ready, 0.5, 0.01) == [(2.0, 6.5)]
    assert bucket_model.bucket_times([[0], [1]], sizes, ready, 0.5, 0.01) == [(2.0, 5.5), (5.5, 7.0)]
    assert bucket_model.exposed([[1], [0]], sizes, ready, 0.5, 0.01) == 4.0
    assert bucket_model.best_split(sizes, ready, 0.5, 0.01) == [[1], [0]]
    assert bucket_model.ready_order([3.0, 1.0, 2.0, 1.0]) == [1, 3, 2, 0]


def test_cut_by_cap_is_plan_buckets_on_the_same_sizes():
    sizes = [40, 8, 8, 100, 4, 4, 60]
    tensors = [torch.zeros(n // 4) for n in sizes]     # float32: 4 bytes an element
    order = [6, 5, 4, 3, 2, 1, 0]
    for cap in (1, 16, 50, 64, 1000):
        by_tensors = [[next(i for i, t in enumerate(tensors) if t is p) for p in b]
                      for b in plan_buckets([tensors[i] for i in order], cap)]
        assert bucket_model.cut_by_cap(order, sizes, cap) == by_tensors


def _ordered_partitions(items):
    """Every list of non-empty buckets, in every order, that holds each item once."""
    if not items:
        yield []
        return
    for k in range(1, len(items) + 1):
        for first in itertools.combinations(items, k):
            rest = [i for i in items if i not in first]
            for tail in _ordered_partitions(rest):
                yield [list(first)] + tail


@pytest.mark.parametrize("seed", range(4))
def test_no_plan_beats_the_best_contiguous_split_of_the_ready_order(seed):
    """The instructor notes' claim, on small random cases: trying the contiguous splits of the ready order is enough
    (every ordered partition of 5 gradients is tried)."""
    g = torch.Generator().manual_seed(seed)
    sizes = [int(x) for x in torch.randint(1, 1000, (5,), generator=g)]
    ready = [float(x) for x in torch.rand(5, generator=g)]
    alpha, beta = float(torch.rand(1, generator=g)) * 0.3, 1e-3
    best = bucket_model.step_end(bucket_model.best_split(sizes, ready, alpha, beta), sizes, ready, alpha, beta)
    every = min(bucket_model.step_end(p, sizes, ready, alpha, beta) for p in _ordered_partitions(list(range(5))))
    assert math.isclose(best, every, rel_tol=1e-12)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 6, 12])
def test_the_equal_gradients_formula_of_the_summary_is_the_models(k):
    """k equal buckets of n equal gradients ready at a constant rate over T_b expose
    max(α + Mβ/k, T_b/k + kα + Mβ − T_b)."""
    case = _case("equal gradients")
    n, total, t_b = len(case.sizes), sum(case.sizes), max(case.ready)
    for alpha, beta in ((case.alpha, case.beta), (0.05e-3, 1e-9), (5e-3, 1e-10)):
        plan = bucket_model.cut_by_cap(bucket_model.ready_order(case.ready), case.sizes, total / k)
        assert len(plan) == k and all(len(b) == n // k for b in plan)
        formula = max(alpha + total * beta / k, t_b / k + k * alpha + total * beta - t_b)
        assert math.isclose(bucket_model.exposed(plan, case.sizes, case.ready, alpha, beta), formula, rel_tol=1e-12)


def test_the_cases_cover_the_regimes():
    """Latency-bound: one bucket is best; compute-bound: everything but one small last bucket hides; equal gradients:
    the best is in between; bandwidth-bound: the link is busy at least as long as the backward."""
    best = {c.name: bucket_model.best_split(c.sizes, c.ready, c.alpha, c.beta) for c in CHOOSE_CASES}
    assert len(best["latency-bound"]) == 1
    assert len(best["compute-bound"][-1]) == 1
    assert 1 < len(best["equal gradients"]) < len(_case("equal gradients").sizes)
    bandwidth = _case("bandwidth-bound")
    assert sum(bandwidth.sizes) * bandwidth.beta > max(bandwidth.ready)
    gpt = _case("GPT-like")
    assert best["GPT-like"][-1] == [0] and gpt.ready[0] == max(gpt.ready)    # the embedding alone, last
    probe = _case("out of order")
    assert bucket_model.ready_order(probe.ready) != list(range(len(probe.sizes) - 1, -1, -1))


def test_the_solution_passes(capsys):
    check_choose_buckets(choose_buckets)
    assert capsys.readouterr().out == (
        "✓ choose_buckets is within 5% of the best split on 6 cases (equal gradients, latency-bound, bandwidth-bound, "
        "compute-bound, GPT-like, out of order): your exposed communication is at most 1.000× the best's, under "
        "labkit.bucket_model\n")


def test_another_design_within_the_tolerance_passes_too(capsys):
    """Any buckets within the tolerance pass: here the best cap, found by timing every cap with labkit's model."""
    def best_cap(sizes, ready, alpha, beta):
        order = bucket_model.ready_order(ready)
        caps = {sum(sizes[i] for i in order[a:b]) for a in range(len(order)) for b in range(a + 1, len(order) + 1)}
        plans = [bucket_model.cut_by_cap(order, sizes, cap) for cap in sorted(caps)]
        return min(plans, key=lambda p: bucket_model.step_end(p, sizes, ready, alpha, beta))
    check_choose_buckets(best_cap)
    assert "at most 1.009× the best's" in capsys.readouterr().out


def test_the_solution_is_quick_on_many_parameters():
    n = 400
    sizes, ready = [1000 + 7 * i for i in range(n)], [1e-4 * (n - i) for i in range(n)]
    plan = choose_buckets(sizes, ready, 1e-3, 1e-9)
    assert sorted(i for b in plan for i in b) == list(range(n))


@pytest.mark.parametrize("mistake", CHOOSE_MISTAKES, ids=lambda m: m.name)
def test_every_known_wrong_choice_is_named_with_its_own_message(mistake):
    message = assert_choice_rejected(mistake.variant, literal_parts(mistake.says))
    assert "the best split of the ready order ends" in message
    for other in CHOOSE_MISTAKES:
        if other is not mistake:
            assert not all(part in message for part in literal_parts(other.says)), other.name


def test_the_known_wrong_choices_are_told_apart_on_the_cases():
    outputs = {m.name: tuple(tuple(map(tuple, m.variant(*_args(c)))) for c in CHOOSE_CASES) for m in CHOOSE_MISTAKES}
    assert len(set(outputs.values())) == len(CHOOSE_MISTAKES)


@pytest.mark.parametrize("fn,expected", [
    pytest.param(lambda s, r, a, b: [bucket_model.ready_order(r)[:2], bucket_model.ready_order(r)[2:]],
                 ["on the equal gradients case", "your buckets are not the best", "yours exposes 1.68× as much",
                  "b1 = [9, 8, 7, 6, ..., 0] (10 params), 20 MiB, ready 6 ms"], id="an_unnamed_plan"),
    pytest.param(lambda s, r, a, b: list(reversed(choose_buckets(s, r, a, b))),
                 ["your buckets are not the best", "Bucket 0 waits for parameter"], id="buckets_reversed"),
    pytest.param(lambda s, r, a, b: None, ["returned None", "return a list of buckets"], id="none"),
    pytest.param(lambda s, r, a, b: [4, 4, 4], ["bucket 0 is a number (4)", "the number of parameters per bucket?"],
                 id="counts"),
    pytest.param(lambda s, r, a, b: list(range(len(s))), ["bucket 0 is a number (0)", "a flat list of indices?"],
                 id="flat"),
    pytest.param(lambda s, r, a, b: [], ["returned no bucket"], id="empty"),
    pytest.param(lambda s, r, a, b: [list(range(len(s))), []], ["bucket 1 is empty"], id="empty_bucket"),
    pytest.param(lambda s, r, a, b: [list(range(len(s))), [0]], ["parameter 0 is in bucket 0 and in bucket 1"],
                 id="twice"),
    pytest.param(lambda s, r, a, b: [list(range(1, len(s) - 1))], ["parameters 0 and 11 in no bucket"],
                 id="missing"),
    pytest.param(lambda s, r, a, b: [list(range(len(s) + 1))], ["bucket 0 holds 12: the parameters are 0 .. 11"],
                 id="out_of_range"),
    pytest.param(lambda s, r, a, b: [[float(i) for i in range(len(s))]], ["bucket 0 holds a float (0.0)"],
                 id="float_index"),
])
def test_wrong_choices_are_explained(fn, expected):
    assert_choice_rejected(fn, expected)


def test_stubs_exceptions_and_endless_loops():
    def stub(sizes, ready, alpha, beta):
        raise NotImplementedError("Exercise 3e: choose the buckets; see the instructions above")

    def bare(sizes, ready, alpha, beta):
        raise NotImplementedError

    def broken(sizes, ready, alpha, beta):
        return sizes[len(sizes)]

    with pytest.raises(NotImplementedError, match="^Exercise 3e: choose the buckets"):
        check_choose_buckets(stub)
    with pytest.raises(NotImplementedError, match=r"^Exercise 3e: bare is not written yet"):
        check_choose_buckets(bare)
    assert_choice_rejected(broken, ["broken raised IndexError"])
    with pytest.raises(CheckFailed, match="needs your function"):
        check_choose_buckets("choose_buckets")


def test_an_endless_loop_is_stopped(monkeypatch):
    from labkit.checks import ex03
    monkeypatch.setattr(ex03, "_CHOOSE_SECONDS", 0.3)

    def endless(sizes, ready, alpha, beta):
        while True:
            pass
    assert_choice_rejected(endless, ["did not return within 0.3 s"])


def test_the_tolerance_is_what_the_check_applies():
    """A plan a little worse than the best passes, one beyond the tolerance fails: built on the compute-bound case,
    where the best exposes one gradient's all-reduce."""
    case = _case("compute-bound")
    best = bucket_model.exposed(bucket_model.best_split(case.sizes, case.ready, case.alpha, case.beta), *_args(case))
    order = bucket_model.ready_order(case.ready)
    two_last = bucket_model.exposed([order[:-2], order[-2:]], *_args(case))
    assert two_last > (1 + CHOOSE_TOLERANCE) * best     # the last two together: beyond the tolerance
    bandwidth = _case("bandwidth-bound")

    def one_per_parameter_when_bandwidth_bound(sizes, ready, alpha, beta):   # 0.9 % off there: within
        if (sizes, ready) == (list(bandwidth.sizes), list(bandwidth.ready)):
            return [[i] for i in bucket_model.ready_order(ready)]
        return choose_buckets(sizes, ready, alpha, beta)
    check_choose_buckets(one_per_parameter_when_bandwidth_bound)

    def last_two_together(sizes, ready, alpha, beta):
        return [order[:-2], order[-2:]] if (sizes, ready) == (list(case.sizes), list(case.ready)) else \
            choose_buckets(sizes, ready, alpha, beta)
    assert_choice_rejected(last_two_together, ["on the compute-bound case", "yours exposes 1.68× as much"])
