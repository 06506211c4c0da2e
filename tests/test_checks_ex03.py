"""The checkers of exercise 3 accept the solution notebook's BucketedDDP and reject each known-wrong version
with a message that names the mistake: no division by N (with the factor measured), waiting on the wrong
handle (the bucket never waited on is named), buckets in registration order (no overlap with backward), no
broadcast at wrap time (rank r's weights differ from rank 0's), and more. A wrong version stops at the
first world size (3), in one launch; the solution runs on every default world size."""

import functools
from pathlib import Path

import nbformat
import pytest
import torch
import torch.distributed as dist

from labkit.checks import CheckFailed
from labkit.checks.ex03 import (check_broadcast, check_bucket_plan, check_bucketed_ddp, check_finish_backward,
                                check_on_grad_ready)
from labkit.ddp import BucketedDDP as LabkitBucketedDDP
from labkit.ddp import plan_buckets

ROOT = Path(__file__).resolve().parents[1]


def _solution_class():
    """BucketedDDP exactly as the solution notebook defines it (its import cell, then its class cell)."""
    nb = nbformat.read(ROOT / "solutions" / "03_ddp_exercise.ipynb", as_version=4)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    namespace = {"__name__": "__main__"}   # as in a notebook: its functions and classes travel by value
    exec(compile(code[0], "solution-imports", "exec"), namespace)
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
        "the parameters within 1e-14 of torch's; the all-reduces launched in bucket order during backward and "
        "each one waited on",
        ""]


def test_labkits_class_that_the_task_checks_mix_in_passes_on_its_own(capsys):
    check_bucketed_ddp(LabkitBucketedDDP, world_sizes=(2,))
    assert capsys.readouterr().out.startswith("✓ BucketedDDP matches torch's DistributedDataParallel on 2 "
                                              "processes")


# --------------------------------------------------------------------------------------------
# The four known-wrong versions of the brief, each named (by the whole check and by its task's check)
# --------------------------------------------------------------------------------------------

class NoDivision(BucketedDDP):
    """3c without the division by the world size: the gradients are N times the mean."""

    def on_grad_ready(self, param):
        index, offset = self.bucket_of[param]
        bucket = self.buckets[index]
        bucket.buffer[offset:offset + param.numel()].copy_(param.grad.reshape(-1))
        bucket.ready += 1
        while (self.next_to_launch < len(self.buckets)
               and self.buckets[self.next_to_launch].ready == len(self.buckets[self.next_to_launch].params)):
            full = self.buckets[self.next_to_launch]
            full.work = dist.all_reduce(full.buffer, async_op=True)
            self.next_to_launch += 1


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


class OnlyLastHandle(BucketedDDP):
    """3d waits only on the last bucket's handle ("it finishes last anyway")."""

    def finish_backward(self):
        self.buckets[-1].work.wait()
        for bucket in self.buckets:
            for p, offset in zip(bucket.params, bucket.offsets):
                p.grad.copy_(bucket.buffer[offset:offset + p.numel()].view_as(p.grad))


class RegistrationOrder(BucketedDDP):
    """3b in module.parameters() order: bucket 0 holds the embedding, whose gradient is ready last."""

    def bucket_plan(self):
        return plan_buckets(self.params, self.bucket_cap_bytes)


class NoBroadcast(BucketedDDP):
    """3a does nothing: every rank keeps the weights of its own seed."""

    def broadcast_from_rank0(self):
        pass


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


@pytest.mark.parametrize("wrong,check,expected", [
    (NoDivision, check_bucketed_ddp, ["NoDivision is wrong "] + NO_DIVISION),
    (NoDivision, check_on_grad_ready, ["NoDivision.on_grad_ready is wrong "] + NO_DIVISION),
    (SameHandleEveryTime, check_bucketed_ddp, ["SameHandleEveryTime is wrong "] + WRONG_HANDLE +
     ["(the handles waited on were those of bucket 1 (2 times))"]),
    (OnlyLastHandle, check_bucketed_ddp, WRONG_HANDLE + ["(the handles waited on were those of bucket 1)"]),
    (OnlyLastHandle, check_finish_backward, ["OnlyLastHandle.finish_backward is wrong "] + WRONG_HANDLE),
    (RegistrationOrder, check_bucketed_ddp, ["RegistrationOrder is wrong "] + REGISTRATION_ORDER),
    (RegistrationOrder, check_bucket_plan, ["RegistrationOrder.bucket_plan is wrong "] + REGISTRATION_ORDER),
    (NoBroadcast, check_bucketed_ddp, ["NoBroadcast is wrong "] + NO_BROADCAST),
    (NoBroadcast, check_broadcast, ["NoBroadcast.broadcast_from_rank0 is wrong "] + NO_BROADCAST[1:]),
], ids=["no-division", "no-division-3c", "same-handle", "last-handle", "last-handle-3d", "registration-order",
        "registration-order-3b", "no-broadcast", "no-broadcast-3a"])
def test_the_four_known_mistakes_are_named(wrong, check, expected):
    assert_rejected(check, wrong, expected)


# --------------------------------------------------------------------------------------------
# More known-wrong versions
# --------------------------------------------------------------------------------------------

class BroadcastParametersOnly(BucketedDDP):
    def broadcast_from_rank0(self):
        with torch.no_grad():
            for t in self.module.parameters():
                dist.broadcast(t, src=0)


class BroadcastTrainableOnly(BucketedDDP):
    def broadcast_from_rank0(self):
        with torch.no_grad():
            for t in self.params:
                dist.broadcast(t, src=0)


class BroadcastWithAutograd(BucketedDDP):
    def broadcast_from_rank0(self):
        for t in [*self.module.parameters(), *self.module.buffers()]:
            dist.broadcast(t, src=0)


class FrozenInAPlan(BucketedDDP):
    def bucket_plan(self):
        return plan_buckets(reversed(list(self.module.parameters())), self.bucket_cap_bytes)


class LaunchedAsTheyFill(BucketedDDP):
    def on_grad_ready(self, param):
        index, offset = self.bucket_of[param]
        bucket = self.buckets[index]
        bucket.buffer[offset:offset + param.numel()].copy_(param.grad.reshape(-1))
        bucket.ready += 1
        if bucket.ready == len(bucket.params):
            bucket.buffer.div_(self.world_size)
            bucket.work = dist.all_reduce(bucket.buffer, async_op=True)


class Synchronous(BucketedDDP):
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


class WaitsInTheHook(BucketedDDP):
    def on_grad_ready(self, param):
        super().on_grad_ready(param)
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()


class LaunchesAtTheEnd(BucketedDDP):
    def on_grad_ready(self, param):
        index, offset = self.bucket_of[param]
        self.buckets[index].buffer[offset:offset + param.numel()].copy_(param.grad.reshape(-1))

    def finish_backward(self):
        for bucket in self.buckets:
            bucket.buffer.div_(self.world_size)
            bucket.work = dist.all_reduce(bucket.buffer, async_op=True)
        super().finish_backward()


class DividesAfterLaunching(BucketedDDP):
    def on_grad_ready(self, param):
        index, offset = self.bucket_of[param]
        bucket = self.buckets[index]
        bucket.buffer[offset:offset + param.numel()].copy_(param.grad.reshape(-1))
        bucket.ready += 1
        while (self.next_to_launch < len(self.buckets)
               and self.buckets[self.next_to_launch].ready == len(self.buckets[self.next_to_launch].params)):
            full = self.buckets[self.next_to_launch]
            full.work = dist.all_reduce(full.buffer, async_op=True)
            full.buffer.div_(self.world_size)   # too late: the all-reduce sums what it was given
            self.next_to_launch += 1


class CopiesBeforeWaiting(BucketedDDP):
    def finish_backward(self):
        for bucket in self.buckets:
            for p, offset in zip(bucket.params, bucket.offsets):
                p.grad.copy_(bucket.buffer[offset:offset + p.numel()].view_as(p.grad))
            bucket.work.wait()


class NeverCopiesBack(BucketedDDP):
    def finish_backward(self):
        for bucket in self.buckets:
            bucket.work.wait()


class WrongSlice(BucketedDDP):
    def finish_backward(self):
        for bucket in self.buckets:
            bucket.work.wait()
            for p in bucket.params:
                p.grad.copy_(bucket.buffer[:p.numel()].view_as(p.grad))


def _averaging_all_reduce(cls):
    """``cls`` whose all-reduces pass op=ReduceOp.AVG (the rest of its code unchanged)."""
    class Averaging(cls):
        def on_grad_ready(self, param):
            watched = dist.all_reduce            # during a check: the check's recording all-reduce
            dist.all_reduce = functools.partial(watched, op=dist.ReduceOp.AVG)
            try:
                super().on_grad_ready(param)
            finally:
                dist.all_reduce = watched
    Averaging.__name__ = f"Averaging{cls.__name__}"
    return Averaging


def test_reduce_op_avg_is_an_average_as_in_exercise_1(capsys):
    """One rule set across the exercises: ReduceOp.AVG without dividing is accepted (exercise 1 accepts it)."""
    check_on_grad_ready(_averaging_all_reduce(NoDivision))
    assert capsys.readouterr().out.startswith("✓ AveragingNoDivision.on_grad_ready is correct")
    assert_rejected(check_on_grad_ready, _averaging_all_reduce(BucketedDDP), [
        "is 1/3 of the average", "op=ReduceOp.AVG already divides by N"])


@pytest.mark.parametrize("wrong,expected", [
    (BroadcastParametersOnly, ["The parameters agree, but the buffer scale (self.module.buffers()) did not arrive"]),
    (BroadcastTrainableOnly, ["rank 1's initial weights differ from rank 0's: frozen.weight[0, 0]",
                              "The trainable parameters agree, but frozen.weight, frozen.bias, scale differ",
                              "not self.params", "and the buffers (self.module.buffers())."]),
    (BroadcastWithAutograd, ["PyTorch warned on rank 0: \"c10d::broadcast_: an autograd kernel was not registered",
                             "Broadcast under torch.no_grad()"]),
    (FrozenInAPlan, ["FrozenInAPlan.bucket_plan is wrong (N=3 ranks, bucket_cap_mb=1 (1 bucket)): bucket 0 holds "
                     "frozen.bias, a frozen parameter (requires_grad=False)"]),
    (LaunchedAsTheyFill, ["(1 parameter per bucket)), in the first backward: the all-reduces were launched in the "
                          "bucket order [2, 3, 0, 1, 4]: bucket 2 before bucket 0", "strictly in index order"]),
    (Synchronous, ["rank 0 called dist.all_reduce for bucket 0 (hidden.bias, hidden.weight, out.bias, out.weight, "
                   "emb.weight) without async_op=True"]),
    (WaitsInTheHook, ["(2 buckets)), in the first backward: on rank 0, the all-reduce of bucket 0 (hidden.bias, "
                      "hidden.weight, out.bias, out.weight) was waited on during the backward pass, when only 4 of "
                      "the 5 gradients were ready"]),
    (LaunchesAtTheEnd, ["(2 buckets)), in the first backward: no all-reduce started before backward had produced "
                        "every gradient (the first, of bucket 0 (hidden.bias, hidden.weight, out.bias, out.weight), "
                        "started after all 5 were ready)",
                        "Launch each bucket from on_grad_ready as soon as it is full"]),
    (DividesAfterLaunching, ["every gradient is 3 times the average"]),
    (CopiesBeforeWaiting, ["emb.weight.grad is rank 0's own gradient divided by N", "only after its handle's wait()"]),
    (NeverCopiesBack, ["emb.weight.grad is rank 0's own gradient (in bucket 0 (", "), not the average"]),
    (WrongSlice, ["on rank 0, emb.weight.grad[0, 0] is ", "at its own offset"]),
])
def test_more_mistakes_are_named(wrong, expected):
    assert_rejected(check_bucketed_ddp, wrong, expected)


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


def test_a_skipped_all_reduce_is_stopped_after_the_timeout():
    with pytest.raises(CheckFailed) as info:
        check_bucketed_ddp(Rank0SkipsTheLastBucket, timeout=2)
    message = str(info.value)
    assert message.startswith("Rank0SkipsTheLastBucket did not finish on 3 processes"), message
    assert "Every rank must call the same collectives in the same order" in message


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
