"""The checkers of exercise 5 accept the solution notebook's f, g and tensor-parallel layers and reject each
known-wrong version with a message that names the mistake: f's backward without its all-reduce (a partial
sum), f's forward or g's backward communicating too (the factor tp measured), g's forward without its
all-reduce, averaging instead of summing, a gradient or an input all-reduced in place, `group` ignored, the
row bias added tp times, a layer slicing the wrong dimension or taking the shards in the wrong order, and
more. A wrong version stops at the first world size (3), in one launch; the solution runs on every default
world size. The exercise notebook's stubs are reported as not written, every one of them by name."""

from pathlib import Path

import nbformat
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from labkit.checks import CheckFailed
from labkit.checks.ex05 import check_column_parallel, check_f_and_g, check_parallel_mlp, check_row_parallel

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = "05_tensor_parallel_exercise.ipynb"
CLASS_CELLS = ("class CopyToParallel", "class ColumnParallelLinear", "class RowParallelLinear")


def _namespace(folder="solutions", **replace):
    """The notebook's import cell and its class cells, run in a fresh namespace; then ``replace`` (e.g. a wrong
    f), which the layers pick up: their forward looks CopyToParallel and ReduceFromParallel up when it runs."""
    nb = nbformat.read(ROOT / folder / NOTEBOOK, as_version=4)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    namespace = {"__name__": "__main__"}   # as in a notebook: its functions and classes travel by value
    exec(compile(code[0], f"{folder}-imports", "exec"), namespace)
    for source in code:
        if source.startswith(CLASS_CELLS):
            exec(compile(source, f"{folder}-classes", "exec"), namespace)
    namespace.update(replace)
    return namespace


SOLUTION = _namespace()
CopyToParallel, ReduceFromParallel = SOLUTION["CopyToParallel"], SOLUTION["ReduceFromParallel"]
ColumnParallelLinear, RowParallelLinear = SOLUTION["ColumnParallelLinear"], SOLUTION["RowParallelLinear"]


def assert_rejected(check, args, expected, **kwargs):
    """``check(*args)`` raises CheckFailed, and its message contains every text of ``expected``."""
    with pytest.raises(CheckFailed) as info:
        check(*args, **kwargs)
    for text in expected:
        assert text in str(info.value), str(info.value)
    return str(info.value)


# --------------------------------------------------------------------------------------------
# The solution passes; the stubs read as not written
# --------------------------------------------------------------------------------------------

def test_the_solution_passes_every_check(capsys):
    check_f_and_g(CopyToParallel, ReduceFromParallel)
    check_column_parallel(ColumnParallelLinear)
    check_row_parallel(RowParallelLinear)
    check_parallel_mlp(ColumnParallelLinear, RowParallelLinear)
    assert capsys.readouterr().out.split("\n") == [
        "✓ CopyToParallel (f) and ReduceFromParallel (g) are correct on 1, 2, 3 and 4 processes and in groups of 2 "
        "of 4 processes: f's forward is the identity and its backward sums the ranks' gradients, g's forward sums "
        "and its backward is the identity; one all-reduce each, in the right direction; the incoming gradient and "
        "the input left as they were",
        "✓ ColumnParallelLinear is correct on 1, 2, 3 and 4 processes (the shards also in groups of 2 of 4 processes): "
        "rank r keeps rows [r·out/tp, (r+1)·out/tp) of W and b; its output features, the input gradient (one all-reduce, in backward) and the weight and bias "
        "gradients equal the dense nn.Linear's, sliced the same way",
        "✓ RowParallelLinear is correct on 1, 2, 3 and 4 processes (the shards also in groups of 2 of 4 processes): "
        "rank r keeps columns [r·in/tp, (r+1)·in/tp) of W and the whole bias, added once after the sum; the output (one all-reduce, in forward), the input slice's "
        "gradient and the weight and bias gradients equal the dense nn.Linear's, sliced the same way",
        "✓ ColumnParallelLinear → GELU → RowParallelLinear equals the dense MLP on 1, 2, 3 and 4 processes (and in "
        "tensor-parallel groups of 2 on 4 processes): the output, the input gradient and every weight and bias "
        "gradient, sliced as the shards are; one all-reduce in forward, one in backward",
        ""]


def test_the_exercise_stubs_are_reported_as_not_written_each_by_name():
    stubs = _namespace("exercises")
    cases = [(check_f_and_g, ("CopyToParallel", "ReduceFromParallel"), ["5a", "5b", "5c", "5d"]),
             (check_column_parallel, ("ColumnParallelLinear",), ["5e", "5f"]),
             (check_row_parallel, ("RowParallelLinear",), ["5g", "5h"]),
             (check_parallel_mlp, ("ColumnParallelLinear", "RowParallelLinear"), ["5e", "5f", "5g", "5h"])]
    for check, names, ids in cases:
        with pytest.raises(NotImplementedError) as info:
            check(*(stubs[n] for n in names), world_sizes=(2,))
        message = str(info.value)
        assert message.startswith(f"Exercise {ids[0]}: "), message
        for exercise_id in ids:
            assert f"Exercise {exercise_id}: " in message, message


def test_one_piece_left_is_named_alone_and_a_students_own_not_implemented_is_worded():
    class FDone(CopyToParallel):
        pass

    class GNoBackward(ReduceFromParallel):
        @staticmethod
        def backward(ctx, grad):
            raise NotImplementedError

    with pytest.raises(NotImplementedError) as info:
        check_f_and_g(FDone, GNoBackward, world_sizes=(2,))
    assert str(info.value) == ("Exercise 5d: GNoBackward.backward is not written yet (it raised NotImplementedError); "
                               "see the instructions above")


# --------------------------------------------------------------------------------------------
# f and g: the known-wrong versions
# --------------------------------------------------------------------------------------------

class FNoAllReduce(torch.autograd.Function):
    """f whose backward forgets the all-reduce: x.grad is this rank's own contribution."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class FReducesInForwardToo(CopyToParallel):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        total = x.clone()
        dist.all_reduce(total, group=group)
        return total


class FAverages(CopyToParallel):
    @staticmethod
    def backward(ctx, grad):
        total = grad.clone()
        dist.all_reduce(total, group=ctx.group)
        return total / dist.get_world_size(ctx.group), None


class FInPlace(CopyToParallel):
    """All-reduces the gradient autograd hands it, in place, and returns it."""

    @staticmethod
    def backward(ctx, grad):
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class FAverageOp(CopyToParallel):
    @staticmethod
    def backward(ctx, grad):
        total = grad.clone()
        dist.all_reduce(total, op=dist.ReduceOp.AVG, group=ctx.group)
        return total, None


class FIgnoresGroup(CopyToParallel):
    @staticmethod
    def backward(ctx, grad):
        total = grad.clone()
        dist.all_reduce(total)
        return total, None


class FOneGradient(CopyToParallel):
    @staticmethod
    def backward(ctx, grad):
        total = grad.clone()
        dist.all_reduce(total, group=ctx.group)
        return total


class FForwardMean(CopyToParallel):
    """The right numbers (the mean of tp equal copies is x), but an all-reduce in every forward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        total = x.clone()
        dist.all_reduce(total, group=group)
        return total / dist.get_world_size(group)


class GNoAllReduce(ReduceFromParallel):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.clone()


class GReducesInBackwardToo(ReduceFromParallel):
    @staticmethod
    def backward(ctx, grad):
        total = grad.clone()
        dist.all_reduce(total, group=ctx.group)
        return total, None


class GAverages(ReduceFromParallel):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        total = x.clone()
        dist.all_reduce(total, group=group)
        return total / dist.get_world_size(group)


class GInPlace(ReduceFromParallel):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        dist.all_reduce(x, group=group)
        return x


F_BACKWARD = "f's backward must all-reduce (sum) the gradient"
G_FORWARD = "g's forward must all-reduce (sum) its input"
G_BACKWARD = "g's backward must be the identity"
F_FORWARD = "f's forward must be the identity"
AVERAGED = "averaged instead of summed"
HEAD_3 = " is wrong on 3 processes (tp = 3): on rank "


@pytest.mark.parametrize("f,g,expected", [
    (FNoAllReduce, ReduceFromParallel,
     ["FNoAllReduce (f)" + HEAD_3 + "0, after y = FNoAllReduce.apply(x, group); y.backward(dy) with each rank's own "
      "dy (its slice's dL/dy): x.grad[0, 0] is ", "x.grad is rank 0's own dy, only its partial sum. " + F_BACKWARD]),
    (FReducesInForwardToo, ReduceFromParallel,
     ["FReducesInForwardToo (f)" + HEAD_3 + "0, y = FReducesInForwardToo.apply(x, group): y[0, 0] is ",
      "y is tp times x, tp times too large (measured factor 3 = tp), after 1 all-reduce in f's forward. " + F_FORWARD]),
    (FAverages, ReduceFromParallel, ["FAverages (f)" + HEAD_3, "x.grad is the mean of the ranks' dy, tp times too "
                                     "small (measured factor 1/3): " + AVERAGED]),
    (FAverageOp, ReduceFromParallel,
     ["FAverageOp (f) and ReduceFromParallel (g) are wrong on 3 processes (tp = 3): on rank 0, dist.all_reduce in f's "
      "backward was called with op=ReduceOp.AVG: " + AVERAGED]),
    (FInPlace, ReduceFromParallel,
     ["FInPlace (f)" + HEAD_3 + "0, in out = x + FInPlace.apply(x, group) (x used twice, as in a residual "
      "connection)", "f's backward changed the incoming gradient in place", "all-reduce a copy"]),
    (CopyToParallel, GNoAllReduce,
     ["GNoAllReduce (g)" + HEAD_3 + "0, y = GNoAllReduce.apply(x_r, group) with each rank's own x_r: y[0, 0] is ",
      "y is rank 0's own x_r, only its partial sum (0 all-reduces in g's forward). " + G_FORWARD]),
    (CopyToParallel, GReducesInBackwardToo,
     ["GReducesInBackwardToo (g)" + HEAD_3 + "0, after y = GReducesInBackwardToo.apply(x_r, group); y.backward(dy)",
      "x_r.grad is tp times too large (measured factor 3 = tp), after 1 all-reduce in g's backward (expected none). "
      + G_BACKWARD]),
    (CopyToParallel, GAverages, ["y is the mean of the ranks' x_r, tp times too small (measured factor 1/3): "
                                 + AVERAGED]),
    (CopyToParallel, GInPlace, ["GInPlace (g)" + HEAD_3 + "0, y = GInPlace.apply(x_r, group) changed its input x_r",
                                "All-reduce a copy"]),
    (FForwardMean, ReduceFromParallel,
     ["the numbers are right, but on rank 0 there was 1 all-reduce in f's forward: every rank already holds x, so "
      "f's forward needs no communication"]),
], ids=["f-no-all-reduce", "f-forward-all-reduce", "f-averages", "f-average-op", "f-in-place", "g-no-all-reduce",
        "g-backward-all-reduce", "g-averages", "g-in-place", "f-forward-communicates"])
def test_wrong_f_and_g_are_named(f, g, expected):
    assert_rejected(check_f_and_g, (f, g), expected)


def test_f_ignoring_its_group_is_named_in_groups_of_two():
    assert_rejected(check_f_and_g, (FIgnoresGroup, ReduceFromParallel), [
        "FIgnoresGroup (f) and ReduceFromParallel (g) are wrong on 4 processes in tensor-parallel groups of 2",
        "an all-reduce in f's backward ran over 4 ranks, not over the 2 ranks of `group`"], world_sizes=(4,))


def test_a_backward_with_one_gradient_is_explained():
    assert_rejected(check_f_and_g, (FOneGradient, ReduceFromParallel), [
        "returned an incorrect number of gradients (expected 2, got 1)",
        "backward returns (the gradient for x, None), None for group"])


# --------------------------------------------------------------------------------------------
# The layers: the known-wrong versions
# --------------------------------------------------------------------------------------------

class ColumnSlicesInputs(ColumnParallelLinear):
    """Slices the last dimension: the weight's input features (the bias, 1-D, comes out right)."""

    def shard(self, tensor):
        return tensor.chunk(self.tp, dim=-1)[self.rank]


class ColumnSlicesColumns(ColumnParallelLinear):
    """Slices dim 1, which the 1-D bias does not have: the error comes after the wrong weight."""

    def shard(self, tensor):
        step = tensor.shape[1] // self.tp
        return tensor[:, self.rank * step:(self.rank + 1) * step]


class ColumnReversed(ColumnParallelLinear):
    def shard(self, tensor):
        step = tensor.shape[0] // self.tp
        k = self.tp - 1 - self.rank
        return tensor[k * step:(k + 1) * step]


class ColumnWholeBias(ColumnParallelLinear):
    def shard(self, tensor):
        return super().shard(tensor) if tensor.dim() == 2 else tensor


class ColumnWholeWeight(ColumnParallelLinear):
    def shard(self, tensor):
        return tensor


class ColumnGathers(ColumnParallelLinear):
    """Returns the whole output, gathered from the ranks."""

    def forward(self, x):
        y = F.linear(CopyToParallel.apply(x, self.group), self.weight, self.bias)
        parts = [torch.empty_like(y) for _ in range(self.tp)]
        dist.all_gather(parts, y.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


class ColumnWithoutF(ColumnParallelLinear):
    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class RowSlicesOutputs(RowParallelLinear):
    def shard(self, weight):
        return weight.chunk(self.tp, dim=0)[self.rank]


class RowReversed(RowParallelLinear):
    def shard(self, weight):
        step = weight.shape[1] // self.tp
        k = self.tp - 1 - self.rank
        return weight[:, k * step:(k + 1) * step]


class RowBiasOnEveryRank(RowParallelLinear):
    """The bias added before the all-reduce, on every rank: the sum holds tp copies of it."""

    def forward(self, x_r):
        return ReduceFromParallel.apply(F.linear(x_r, self.weight, self.bias), self.group)


class RowBiasOnRankZero(RowParallelLinear):
    """The right output, but the other ranks' copies of the bias get no gradient."""

    def forward(self, x_r):
        partial = F.linear(x_r, self.weight, self.bias if self.rank == 0 else None)
        return ReduceFromParallel.apply(partial, self.group)


class RowBroken(RowParallelLinear):
    def forward(self, x_r):
        return ReduceFromParallel.apply(x_r @ self.weight, self.group) + self.bias


WRONG_DIM = "sliced the wrong dimension"
WRONG_ORDER = "the shards are in the wrong order"


@pytest.mark.parametrize("check,args,expected", [
    (check_column_parallel, (ColumnSlicesInputs,),
     ["ColumnSlicesInputs" + HEAD_3[:-10] + ": ColumnSlicesInputs.shard(W) on rank 0 " + WRONG_DIM + ": it kept cols "
      "[0, 4) of W, shape (24, 4), this rank's input features (the dense W has shape (out, in) = (24, 12)). A "
      "column-parallel layer splits W by its output features, the rows (dim 0)"]),
    (check_column_parallel, (ColumnSlicesColumns,),
     ["ColumnSlicesColumns.shard(W) on rank 0 " + WRONG_DIM, "\nThen ColumnSlicesColumns(linear, group) raised "
      "IndexError on rank 0: tuple index out of range", "--- traceback of rank 0 ---"]),
    (check_column_parallel, (ColumnReversed,),
     [WRONG_ORDER + ": ColumnReversed.shard(W) on rank 0 kept rows [16, 24) of W, the shard of rank 2; rank 0 keeps "
      "rows [0, 8)", "the outputs come out permuted"]),
    (check_column_parallel, (ColumnWholeBias,), ["ColumnWholeBias.bias on rank 0 is the whole bias b, shape (24,)"]),
    (check_column_parallel, (ColumnWholeWeight,),
     ["ColumnWholeWeight.shard(W) on rank 0 is the whole W, shape (24, 12)"]),
    (check_column_parallel, (ColumnGathers,), ["y has shape (2, 3, 24), expected (2, 3, 8)", "y is the whole output of "
                                               "the dense layer: a ColumnParallelLinear returns its own out/tp output "
                                               "features"]),
    (check_column_parallel, (ColumnWithoutF,),
     ["x.grad is only rank 0's own contribution (its out/tp output features): the forward does not go through f",
      F_BACKWARD]),
    (check_row_parallel, (RowSlicesOutputs,),
     ["RowSlicesOutputs.shard(W) on rank 0 " + WRONG_DIM + ": it kept rows [0, 4) of W, shape (4, 24), this rank's "
      "output features (the dense W has shape (out, in) = (12, 24)). A row-parallel layer splits W by its input "
      "features, the columns (dim 1)"]),
    (check_row_parallel, (RowReversed,), [WRONG_ORDER + ": RowReversed.shard(W) on rank 0 kept cols [16, 24) of W, "
                                          "the shard of rank 2"]),
    (check_row_parallel, (RowBiasOnEveryRank,),
     ["RowBiasOnEveryRank" + HEAD_3 + "0, y = layer(x_r) with x_r = x[..., 0:8]", "y − (x Wᵀ + b) = (tp − 1)·b: the "
      "bias added tp times, once on every rank before the all-reduce"]),
    (check_row_parallel, (RowBiasOnRankZero,),
     ["RowBiasOnRankZero" + HEAD_3 + "1, RowBiasOnRankZero.bias.grad is None after backward"]),
    (check_parallel_mlp, (ColumnReversed, RowParallelLinear), [WRONG_ORDER + ": ColumnReversed.shard(W) on rank 0"]),
], ids=["column-slices-inputs", "column-slices-columns", "column-reversed", "column-whole-bias", "column-whole-weight",
        "column-gathers", "column-without-f",
        "row-slices-outputs", "row-reversed", "row-bias-tp-times", "row-bias-rank-0", "mlp-column-reversed"])
def test_wrong_layers_are_named(check, args, expected):
    assert_rejected(check, args, expected)


# --------------------------------------------------------------------------------------------
# The layers with a wrong f or g: the layer checks name f's and g's mistakes too
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("check,names,replace,expected", [
    (check_column_parallel, ("ColumnParallelLinear",), dict(CopyToParallel=FNoAllReduce),
     ["ColumnParallelLinear" + HEAD_3 + "0, after y.backward(dy): x.grad[0, 0, 0] is ",
      "x.grad is only rank 0's own contribution, a partial sum, after 0 all-reduces in backward. " + F_BACKWARD]),
    (check_column_parallel, ("ColumnParallelLinear",), dict(CopyToParallel=FReducesInForwardToo),
     ["y = (tp·x) W_rᵀ + b_r: f's output came out tp times too large, after 1 all-reduce in forward. " + F_FORWARD]),
    (check_column_parallel, ("ColumnParallelLinear",), dict(CopyToParallel=FAverages),
     ["x.grad is the mean of the ranks' contributions, tp times too small (measured factor 1/3): " + AVERAGED]),
    (check_row_parallel, ("RowParallelLinear",), dict(ReduceFromParallel=GNoAllReduce),
     ["y is rank 0's own partial sum x_r W_rᵀ + b, after 0 all-reduces in forward. " + G_FORWARD]),
    (check_row_parallel, ("RowParallelLinear",), dict(ReduceFromParallel=GReducesInBackwardToo),
     ["RowParallelLinear" + HEAD_3 + "0, after y.backward(dy): RowParallelLinear.weight.grad[0, 0] is ",
      "tp times too large (measured factor 3 = tp), after 1 all-reduce in backward (expected none). " + G_BACKWARD]),
    (check_row_parallel, ("RowParallelLinear",), dict(ReduceFromParallel=GAverages),
     ["y is the mean of the ranks' partial sums (+ b), not their sum: " + AVERAGED]),
    (check_parallel_mlp, ("ColumnParallelLinear", "RowParallelLinear"), dict(CopyToParallel=FNoAllReduce),
     ["ColumnParallelLinear → GELU → RowParallelLinear" + HEAD_3 + "0, after y.backward(dy): x.grad[0, 0, 0] is ",
      "a partial sum, after 0 all-reduces in backward. " + F_BACKWARD]),
    (check_parallel_mlp, ("ColumnParallelLinear", "RowParallelLinear"), dict(CopyToParallel=FReducesInForwardToo),
     ["y is the dense MLP of tp·x: f's output came out tp times too large, after 2 all-reduces in forward. "
      + F_FORWARD]),
    (check_parallel_mlp, ("ColumnParallelLinear", "RowParallelLinear"), dict(ReduceFromParallel=GNoAllReduce),
     ["y is rank 0's own partial sum x_r W_rᵀ + b, after 0 all-reduces in forward. " + G_FORWARD]),
    (check_parallel_mlp, ("ColumnParallelLinear", "RowParallelLinear"), dict(ReduceFromParallel=GReducesInBackwardToo),
     ["RowParallelLinear.weight.grad[0, 0] is ", "tp times too large (measured factor 3 = tp), after 2 all-reduces in "
      "backward (expected 1, f's). " + G_BACKWARD]),
    (check_parallel_mlp, ("ColumnParallelLinear", "RowParallelLinear"), dict(CopyToParallel=FForwardMean),
     ["the numbers are right, but on rank 0 the MLP made 2 all-reduces in forward and 1 all-reduce in backward"]),
], ids=["column-f-no-all-reduce", "column-f-forward", "column-f-averages", "row-g-no-all-reduce", "row-g-backward",
        "row-g-averages", "mlp-f-no-all-reduce", "mlp-f-forward", "mlp-g-no-all-reduce", "mlp-g-backward",
        "mlp-extra-communication"])
def test_layers_with_a_wrong_f_or_g_name_its_mistake(check, names, replace, expected):
    namespace = _namespace(**replace)
    assert_rejected(check, tuple(namespace[n] for n in names), expected)


class FGathers(FNoAllReduce):
    """A valid f: its backward all-gathers the ranks' gradients and sums them (an all-reduce in two steps)."""

    @staticmethod
    def backward(ctx, grad):
        parts = [torch.empty_like(grad) for _ in range(dist.get_world_size(ctx.group))]
        dist.all_gather(parts, grad.contiguous(), group=ctx.group)
        return torch.stack(parts).sum(dim=0), None


class GGathers(torch.autograd.Function):
    """A valid g: its forward all-gathers the partial sums and adds them up."""

    @staticmethod
    def forward(ctx, x, group):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group)            # the group by position, as torch allows
        return torch.stack(parts).sum(dim=0)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def test_f_and_g_written_with_all_gather_pass_every_check_and_are_not_called_all_reduces(capsys):
    """Behaviour, not call names: all-gather + sum is an all-reduce; the ✓ lines say "collective"."""
    namespace = _namespace(CopyToParallel=FGathers, ReduceFromParallel=GGathers)
    column, row = namespace["ColumnParallelLinear"], namespace["RowParallelLinear"]
    check_f_and_g(FGathers, GGathers, world_sizes=(3, 4))
    check_column_parallel(column, world_sizes=(3,))
    check_row_parallel(row, world_sizes=(3,))
    check_parallel_mlp(column, row, world_sizes=(3,))
    out = capsys.readouterr().out
    assert out.count("✓") == 4 and "all-reduce" not in out, out
    assert "one collective each, in the right direction" in out
    assert "the input gradient (one collective, in backward)" in out


def test_a_shard_by_the_world_rank_is_named_in_groups_of_two():
    """A real student's mistake: dist.get_rank() in shard, right as long as the group is the world."""
    class ColumnWorldRank(ColumnParallelLinear):
        def shard(self, tensor):
            step = tensor.shape[0] // self.tp
            return tensor[dist.get_rank() * step:(dist.get_rank() + 1) * step]

    class RowWorldRank(RowParallelLinear):
        def shard(self, weight):
            step = weight.shape[1] // self.tp
            return weight[:, dist.get_rank() * step:(dist.get_rank() + 1) * step]

    for check, cls in ((check_column_parallel, ColumnWorldRank), (check_row_parallel, RowWorldRank)):
        assert_rejected(check, (cls,), [
            f"{cls.__name__} is wrong on 4 processes in tensor-parallel groups of 2",
            "Rank 2 of the world is rank 0 of its group: a shard is cut by the rank in the group, self.rank"])


def test_a_layer_that_is_not_labkits_subclass_is_refused():
    class OwnColumn(torch.nn.Module):
        def __init__(self, linear, group=None):
            super().__init__()

    with pytest.raises(CheckFailed, match=r"OwnColumn must be a subclass of labkit's layer, as in the notebook: "
                                          r"class OwnColumn\(labkit.tensor_parallel.ColumnParallelLinear\)"):
        check_column_parallel(OwnColumn)


def test_layers_that_drop_their_group_are_named_in_groups_of_two():
    class ColumnWithoutGroup(ColumnParallelLinear):
        def forward(self, x):
            return F.linear(CopyToParallel.apply(x, None), self.weight, self.bias)

    assert_rejected(check_parallel_mlp, (ColumnWithoutGroup, RowParallelLinear), [
        "ColumnWithoutGroup → GELU → RowParallelLinear is wrong on 4 processes in tensor-parallel groups of 2",
        "an all-reduce in backward ran over 4 ranks, not over the 2 ranks of `group`",
        "CopyToParallel.apply(x, self.group)"], world_sizes=(4,))


# --------------------------------------------------------------------------------------------
# Errors and hangs in the student's code
# --------------------------------------------------------------------------------------------

def test_an_exception_in_the_students_forward_shows_that_ranks_traceback():
    message = assert_rejected(check_row_parallel, (RowBroken,), [
        "RowBroken raised RuntimeError on rank ", "(world size 3)", "--- traceback of rank "])
    assert "x_r @ self.weight" in message


def test_a_collective_on_one_rank_only_is_stopped_and_explained():
    class GOnRankZero(ReduceFromParallel):
        @staticmethod
        def forward(ctx, x, group):
            total = x.clone()
            if dist.get_rank() == 0:
                dist.all_reduce(total, group=group)
            return total

    assert_rejected(check_f_and_g, (CopyToParallel, GOnRankZero), [
        "did not finish on 3 processes", "Every rank must call the same collectives in the same order"], timeout=2)


def test_not_a_class_is_refused():
    with pytest.raises(CheckFailed, match="pass your class itself"):
        check_column_parallel(ColumnParallelLinear.__init__)
    with pytest.raises(CheckFailed, match=r"must be a subclass of torch.autograd.Function \(class Fake\("
                                          r"torch.autograd.Function\): ...\), called as Fake.apply\(x, group\)"):
        class Fake:
            pass
        check_f_and_g(Fake, ReduceFromParallel)


def test_a_detached_output_is_named():
    class RowDetached(RowParallelLinear):
        def forward(self, x_r):
            return ReduceFromParallel.apply(F.linear(x_r, self.weight), self.group).detach() + self.bias.detach()

    assert_rejected(check_row_parallel, (RowDetached,), [
        "RowDetached" + HEAD_3 + "0, the output y does not require grad"])
