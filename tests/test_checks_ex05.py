"""The checkers of exercise 5 accept the solution notebook's f, g and tensor-parallel layers and reject each
known-wrong version with a message that names the mistake. The known wrong versions are the checker's own tables
(``F_AND_G_MISTAKES``, ``COLUMN_SHARD_MISTAKES``, ...): each row's wrong version, built from labkit's classes, is
given to the check, whose message must hold every fixed part of the row's text. The mistakes that are rules
rather than numbers (an op other than SUM, `group` ignored, communication where none is needed, a deadlock, an
exception, a detached output) are written out below. A wrong version stops at the first world size (3), in one
launch; the solution runs on every default world size. The exercise notebook's stubs are reported as not
written, every one of them by name."""

from pathlib import Path

import pytest
from notebook_code import code_cells, imports_without_pyplot
import torch
import torch.distributed as dist
import torch.nn.functional as F

from labkit.checks import CheckFailed
from labkit.checks.ex05 import (COLUMN_MISTAKES, COLUMN_SHARD_MISTAKES, EMBEDDING_MISTAKES, F_AND_G_MISTAKES,
                                MLP_MISTAKES, ROW_MISTAKES, ROW_SHARD_MISTAKES, check_column_parallel, check_f_and_g,
                                check_parallel_mlp, check_row_parallel, check_vocab_parallel_embedding)
from labkit.checks.harness import literal_parts

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = "05_tensor_parallel_exercise.ipynb"
CLASS_CELLS = ("class CopyToParallel", "class ColumnParallelLinear", "class RowParallelLinear",
               "class VocabParallelEmbedding")


def _namespace(folder="solutions", **replace):
    """The notebook's import cell and its class cells, run in a fresh namespace; then ``replace`` (e.g. a wrong
    f), which the layers pick up: their forward looks CopyToParallel and ReduceFromParallel up when it runs."""
    code = code_cells(ROOT / folder / NOTEBOOK)
    namespace = {"__name__": "__main__"}   # as in a notebook: its functions and classes travel by value
    exec(compile(imports_without_pyplot(code[0]), f"{folder}-imports", "exec"), namespace)
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
# The tables of known mistakes: each row's wrong version is named by its own text
# --------------------------------------------------------------------------------------------

HEAD_3 = " is wrong on 3 processes (tp = 3): "
F_BACKWARD = "f's backward must all-reduce (sum) the gradient"
AVERAGED = "averaged instead of summed"


def wrong(table, name):
    """The arguments of the check that give the row ``name`` of ``table``'s wrong version."""
    variant = next(m.variant for m in table if m.name == name)
    return variant if isinstance(variant, tuple) else (variant,)


TABLES = [(check_f_and_g, m) for m in F_AND_G_MISTAKES] + \
         [(check_column_parallel, m) for m in COLUMN_SHARD_MISTAKES + COLUMN_MISTAKES] + \
         [(check_row_parallel, m) for m in ROW_SHARD_MISTAKES + ROW_MISTAKES] + \
         [(check_parallel_mlp, m) for m in MLP_MISTAKES]


@pytest.mark.parametrize("check,mistake", TABLES, ids=[m.name for _, m in TABLES])
def test_each_known_mistake_is_named(check, mistake):
    args = wrong([mistake], mistake.name)
    message = assert_rejected(check, args, literal_parts(mistake.says))
    names = [a.__name__ for a in args]
    assert any(message.startswith(f"{n} (f) is wrong" if n.startswith("F") else f"{n} (g) is wrong" if
                                  n.startswith("G") else n) for n in names) or message.startswith(names[0]), message
    assert HEAD_3 in message or " are wrong on 3 processes (tp = 3): " in message, message
    table = next(t for t in (F_AND_G_MISTAKES, COLUMN_SHARD_MISTAKES, ROW_SHARD_MISTAKES, COLUMN_MISTAKES,
                             ROW_MISTAKES, MLP_MISTAKES) if mistake in t)
    for other in table:   # and not another row's text (unless this row's own text holds all of it)
        parts = literal_parts(other.says)
        if other is not mistake and not all(p in mistake.says for p in parts):
            assert not all(p in message for p in parts), (other.name, message)


def test_the_tables_name_each_mistake_once():
    names = [m.name for _, m in TABLES]
    assert len(names) == len(set(names))
    for table in (F_AND_G_MISTAKES, COLUMN_SHARD_MISTAKES, ROW_SHARD_MISTAKES, COLUMN_MISTAKES, ROW_MISTAKES,
                  MLP_MISTAKES):   # a row that says what another row of its table says could never be named
        assert len({m.says for m in table}) == len(table), [m.name for m in table]


@pytest.mark.parametrize("check,args,expected", [
    (check_f_and_g, wrong(F_AND_G_MISTAKES, 'f-no-all-reduce'),
     ["FNoAllReduce (f)" + HEAD_3 + "on rank 0, after y = FNoAllReduce.apply(x, group); y.backward(dy) with each "
      "rank's own dy (its slice's dL/dy): x.grad[0, 0]: expected ", " (the sum of the ranks' dy); x.grad is rank 0's "
      "own dy, only its partial sum. " + F_BACKWARD]),
    (check_f_and_g, wrong(F_AND_G_MISTAKES, 'f-forward-all-reduce'),
     ["FReducesInForward (f)" + HEAD_3 + "on rank 0, y = FReducesInForward.apply(x, group): y[0, 0]: expected ",
      "y is tp times x, tp times too large (measured factor 3 = tp), after 1 all-reduce in f's forward. "
      "f's forward must be the identity"]),
    (check_f_and_g, wrong(F_AND_G_MISTAKES, 'g-in-place'),
     ["GInPlace (g)" + HEAD_3 + "on rank 0, y = GInPlace.apply(x_r, group) changed its input x_r: after the call "
      "x_r[0, 0]: expected ", " (its value before). dist.all_reduce(x) writes the sum into x"]),
    (check_row_parallel, wrong(ROW_MISTAKES, 'row-g-backward'),
     ["RowGReducesInBackward" + HEAD_3 + "on rank 0, after y.backward(dy): RowGReducesInBackward.weight.grad[0, 0]: "
      "expected ", "tp times too large (measured factor 3 = tp), after 1 all-reduce in backward (expected none)"]),
    (check_row_parallel, wrong(ROW_MISTAKES, "row-bias-rank-0"),
     ["RowBiasOnRankZero" + HEAD_3 + "on rank 1, after y.backward(dy), RowBiasOnRankZero.bias.grad is None after "
      "backward: rank 1's bias did not take part"]),
    (check_column_parallel, wrong(COLUMN_SHARD_MISTAKES, 'column-reversed'),
     ["the shards are in the wrong order: ColumnReversed.shard(W) on rank 0 kept rows [16, 24) of W, the shard of "
      "rank 2; rank 0 keeps rows [0, 8)"]),
    (check_row_parallel, wrong(ROW_SHARD_MISTAKES, 'row-slices-outputs'),
     ["RowSlicesOutputs.shard(W) on rank 0 sliced the wrong dimension: it kept rows [0, 4) of W, shape (4, 24), this "
      "rank's output features (the dense W has shape (out, in) = (12, 24)). A row-parallel layer splits W by its "
      "input features, the columns (dim 1)"]),
    (check_column_parallel, wrong(COLUMN_MISTAKES, 'column-gathers'),
     ["ColumnGathers" + HEAD_3 + "on rank 0, y = layer(x) with the same x on every rank: y has shape (2, 3, 24), "
      "expected (2, 3, 8) (rank 0's output features: x W_rᵀ + b_r, W_r = W[0:8]); y is the whole output"]),
    (check_parallel_mlp, wrong(MLP_MISTAKES, "mlp-column-without-f"),
     ["ColumnWithoutF → GELU → RowParallelLinear" + HEAD_3 + "on rank 0, after y.backward(dy): x.grad[0, 0, 0]: "
      "expected "]),
], ids=["f-no-all-reduce", "f-forward", "g-in-place", "row-g-backward", "row-bias-rank-1", "column-reversed",
        "row-slices-outputs", "column-gathers", "mlp-column-without-f"])
def test_messages_give_rank_element_expected_and_got(check, args, expected):
    assert_rejected(check, args, expected)


# --------------------------------------------------------------------------------------------
# The mistakes that are rules, not numbers, and the ones that do not fit a table
# --------------------------------------------------------------------------------------------

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


def test_an_op_other_than_sum_is_named():
    assert_rejected(check_f_and_g, (FAverageOp, ReduceFromParallel), [
        "FAverageOp (f) and ReduceFromParallel (g) are wrong on 3 processes (tp = 3): on rank 0, dist.all_reduce in "
        "f's backward was called with op=ReduceOp.AVG: " + AVERAGED])


def test_f_ignoring_its_group_is_named_in_groups_of_two():
    assert_rejected(check_f_and_g, (FIgnoresGroup, ReduceFromParallel), [
        "FIgnoresGroup (f) and ReduceFromParallel (g) are wrong on 4 processes in tensor-parallel groups of 2",
        "an all-reduce in f's backward ran over 4 ranks, not over the 2 ranks of `group`"], world_sizes=(4,))


def test_a_backward_with_one_gradient_is_explained():
    assert_rejected(check_f_and_g, (FOneGradient, ReduceFromParallel), [
        "returned an incorrect number of gradients (expected 2, got 1)",
        "backward returns (the gradient for x, None), None for group"])


def test_communication_where_none_is_needed_is_named():
    assert_rejected(check_f_and_g, (FForwardMean, ReduceFromParallel), [
        "the numbers are right, but on rank 0 there was 1 all-reduce in f's forward: every rank already holds x, so "
        "f's forward needs no communication"])
    namespace = _namespace(CopyToParallel=FForwardMean)
    assert_rejected(check_parallel_mlp, (namespace["ColumnParallelLinear"], namespace["RowParallelLinear"]), [
        "the numbers are right, but on rank 0 the MLP made 2 all-reduces in forward and 1 all-reduce in backward"])


def test_the_students_layer_with_a_wrong_f_or_g_is_named_as_labkits_is():
    """The tables' wrong versions are labkit's layers; the solution's layers with the same wrong f or g read alike."""
    namespace = _namespace(CopyToParallel=wrong(COLUMN_MISTAKES, "column-f-no-all-reduce")[0].f)
    assert_rejected(check_column_parallel, (namespace["ColumnParallelLinear"],), [
        "ColumnParallelLinear" + HEAD_3 + "on rank 0, after y.backward(dy): x.grad[0, 0, 0]: expected ",
        "x.grad is only rank 0's own contribution, a partial sum, after 0 all-reduces in backward. " + F_BACKWARD])
    namespace = _namespace(ReduceFromParallel=wrong(ROW_MISTAKES, "row-g-no-all-reduce")[0].g)
    assert_rejected(check_parallel_mlp, (namespace["ColumnParallelLinear"], namespace["RowParallelLinear"]), [
        "y is rank 0's own partial sum x_r W_rᵀ + b, after 0 all-reduces in forward. g's forward must all-reduce"])


class ColumnSlicesColumns(ColumnParallelLinear):
    """Slices dim 1, which the 1-D bias does not have: the error comes after the wrong weight."""

    def shard(self, tensor):
        step = tensor.shape[1] // self.tp
        return tensor[:, self.rank * step:(self.rank + 1) * step]


def test_a_shard_that_raises_on_the_bias_is_named_by_its_weight_then_the_error():
    assert_rejected(check_column_parallel, (ColumnSlicesColumns,), [
        "ColumnSlicesColumns.shard(W) on rank 0 sliced the wrong dimension", "\nThen ColumnSlicesColumns(linear, "
        "group) raised IndexError on rank 0: tuple index out of range", "--- traceback of rank 0 ---"])


def test_a_wrong_order_of_the_shards_is_named_in_the_mlp():
    assert_rejected(check_parallel_mlp, (*wrong(COLUMN_SHARD_MISTAKES, "column-reversed"), RowParallelLinear),
                    ["the shards are in the wrong order: ColumnReversed.shard(W) on rank 0"])


class FGathers(CopyToParallel):
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

class RowBroken(RowParallelLinear):
    def forward(self, x_r):
        return ReduceFromParallel.apply(x_r @ self.weight, self.group) + self.bias


def test_an_exception_in_the_students_forward_shows_that_ranks_traceback():
    message = assert_rejected(check_row_parallel, (RowBroken,), [
        "RowBroken raised RuntimeError on rank ", "(world size 3)", "--- traceback of rank "])
    assert "x_r @ self.weight" in message


def test_a_collective_on_one_rank_only_is_named_as_a_deadlock():
    class GOnRankZero(ReduceFromParallel):
        @staticmethod
        def forward(ctx, x, group):
            total = x.clone()
            if dist.get_rank() == 0:
                dist.all_reduce(total, group=group)
            return total

    assert_rejected(check_f_and_g, (CopyToParallel, GOnRankZero), [
        "rank 0 waited 1 s in its ", " dist.all_reduce, during g forward, and the other side never came: the run is "
        "deadlocked", "rank 1: had finished its part and was waiting for the others in the check",
        "→ rank 1 went on without that call: every rank must call the same collectives in the same order"], timeout=2)


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
        "RowDetached" + HEAD_3 + "on rank 0, the output y does not require grad"])


# --------------------------------------------------------------------------------------------
# 5i: the vocabulary-parallel embedding, a design task checked by what the embedding does
# --------------------------------------------------------------------------------------------

VocabParallelEmbedding = SOLUTION["VocabParallelEmbedding"]
EMBEDDING_HEAD = " is wrong on 3 processes (tp = 3): "


def test_the_solution_embedding_passes(capsys):
    check_vocab_parallel_embedding(VocabParallelEmbedding)
    assert capsys.readouterr().out == (
        "✓ VocabParallelEmbedding equals nn.Embedding(11, 4) on 2 and 3 processes (the rows cut 4 + 4 + 3 on 3; 6 + 5 "
        "on 2): every rank returns every token's row, each rank's weight.grad is its rows of the dense gradient "
        "(repeated tokens summed), one all-reduce in forward, none in backward\n")


def test_the_embedding_stub_is_reported_as_not_written():
    with pytest.raises(NotImplementedError, match="^Exercise 5i: "):
        check_vocab_parallel_embedding(_namespace("exercises")["VocabParallelEmbedding"], world_sizes=(2,))


@pytest.mark.parametrize("mistake", EMBEDDING_MISTAKES, ids=lambda m: m.name)
def test_each_known_embedding_mistake_is_named(mistake):
    message = assert_rejected(check_vocab_parallel_embedding, (mistake.variant,), literal_parts(mistake.says))
    assert message.startswith(mistake.variant.__name__ + EMBEDDING_HEAD), message
    for other in EMBEDDING_MISTAKES:
        if other is not mistake:
            assert not all(p in message for p in literal_parts(other.says)), (other.name, message)


def test_the_embedding_mistakes_are_named_once():
    assert len({m.name for m in EMBEDDING_MISTAKES}) == len({m.says for m in EMBEDDING_MISTAKES}) == \
        len(EMBEDDING_MISTAKES)


def _variant(name):
    return next(m.variant for m in EMBEDDING_MISTAKES if m.name == name)


def _drops_tokens():
    """Looks up its own tokens only, and returns just those: one row per token of this rank. (The test's classes are
    made in functions: cloudpickle sends them to the workers by value, which then need not import this module.)"""
    class EmbeddingDropsTokens(VocabParallelEmbedding):
        def forward(self, idx):
            mine = (idx >= self.start) & (idx < self.end)
            return ReduceFromParallel.apply(F.embedding(idx[mine] - self.start, self.weight), self.group)
    return EmbeddingDropsTokens


@pytest.mark.parametrize("cls,expected", [
    (_variant("clamped-not-zeroed"),
     ["EmbeddingClamped" + EMBEDDING_HEAD + "on rank 0, y = layer(idx) with the same idx on every rank: y[0, 0, 0] "
      "(token 5, whose row is rank 1's row 1): expected -0.129663, got ", "the ranks that do not hold token 5 added "
      "rows of their own to it"]),
    (_variant("f-instead-of-g"),
     ["(token 5, whose row is rank 1's row 1): expected -0.129663, got 0; on rank 0, y holds the rows of its own "
      "tokens only ([0, 4)) and zeros for the others', after 0 all-reduces in forward"]),
    (_variant("g-backward-all-reduce"),
     ["EmbeddingGBackward" + EMBEDDING_HEAD + "on rank 0, after y.backward(dy) with the same dy on every rank: "
      "weight.grad[0, 0] (rank 0's row 0, token 0, 1 time in idx): expected ", "rank 0's weight.grad is tp times too "
      "large (measured factor 3 = tp), after 1 all-reduce in backward (expected none)"]),
    (_drops_tokens(), ["EmbeddingDropsTokens" + EMBEDDING_HEAD + "in forward, the ranks handed dist.all_reduce "
                            "tensors of different shapes (rank 0 one of shape (5, 4), rank 1 one of shape (5, 4) and "
                            "rank 2 one of shape (4, 4)). A collective combines the ranks' tensors element by element",
                            "(B, T, d) = (2, 7, 4), a row for every token of idx"]),
], ids=["clamped", "f-instead-of-g", "g-backward", "tokens-dropped"])
def test_embedding_messages_give_rank_token_element_expected_and_got(cls, expected):
    assert_rejected(check_vocab_parallel_embedding, (cls,), expected)


def test_no_offset_names_the_rank_that_indexed_out_of_range_and_its_rows():
    """The first rank to fail is named (rank 1 or 2: the others wait in the all-reduce), with its own rows."""
    message = assert_rejected(check_vocab_parallel_embedding, (_variant("no-offset"),), [
        "EmbeddingNoOffset" + EMBEDDING_HEAD + "EmbeddingNoOffset.forward raised IndexError on rank "])
    assert ("on rank 1 (index out of range in self). Rank 1 holds rows [4, 8) of the table, and its self.weight "
            "numbers them 0 .. 3" in message or "on rank 2 (index out of range in self). Rank 2 holds rows [8, 11) of "
            "the table, and its self.weight numbers them 0 .. 2" in message), message


def test_another_right_design_passes(capsys):
    class GatherAndSum(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y, group):
            parts = [torch.empty_like(y) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, y.contiguous(), group=group)
            return torch.stack(parts).sum(dim=0)

        @staticmethod
        def backward(ctx, grad):
            return grad, None

    class EmbeddingOtherDesign(VocabParallelEmbedding):
        """A mask by multiplication, a lookup by indexing, the ranks joined by an all-gather and a sum."""

        def forward(self, idx):
            mine = ((idx >= self.start) & (idx < self.end)).to(self.weight.dtype)
            rows = (idx - self.start).clamp(0, self.weight.shape[0] - 1)
            return GatherAndSum.apply(self.weight[rows] * mine.unsqueeze(-1), self.group)

    check_vocab_parallel_embedding(EmbeddingOtherDesign)
    assert "one collective in forward, none in backward" in capsys.readouterr().out


def test_communication_in_the_embeddings_backward_is_named():
    class GMeanBackward(torch.autograd.Function):
        """g, and in backward an all-reduce of tp equal copies of dL/dy, divided by tp: the right numbers."""

        @staticmethod
        def forward(ctx, y, group):
            ctx.group = group
            total = y.clone()
            dist.all_reduce(total, group=group)
            return total

        @staticmethod
        def backward(ctx, grad):
            total = grad.clone()
            dist.all_reduce(total, group=ctx.group)
            return total / dist.get_world_size(ctx.group), None

    class EmbeddingBackwardMean(VocabParallelEmbedding):
        def forward(self, idx):
            mine = (idx >= self.start) & (idx < self.end)
            y = F.embedding(torch.where(mine, idx - self.start, 0), self.weight).masked_fill(~mine.unsqueeze(-1), 0.0)
            return GMeanBackward.apply(y, self.group)

    assert_rejected(check_vocab_parallel_embedding, (EmbeddingBackwardMean,), [
        "EmbeddingBackwardMean is wrong on 3 processes (tp = 3): the numbers are right, but on rank 0 there was 1 "
        "all-reduce in backward: every rank holds the same dL/dy after g"])


def test_a_detached_embedding_and_a_wrong_class_are_named():
    class EmbeddingDetached(VocabParallelEmbedding):
        def forward(self, idx):
            with torch.no_grad():
                return VocabParallelEmbedding.forward(self, idx)

    assert_rejected(check_vocab_parallel_embedding, (EmbeddingDetached,), [
        "EmbeddingDetached" + EMBEDDING_HEAD + "on rank 0, the output y does not require grad"])
    with pytest.raises(CheckFailed, match="must be a subclass of labkit's embedding"):
        check_vocab_parallel_embedding(torch.nn.Embedding)
    with pytest.raises(CheckFailed, match="pass your class itself"):
        check_vocab_parallel_embedding(VocabParallelEmbedding(torch.nn.Embedding(3, 2)))
