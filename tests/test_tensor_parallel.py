"""labkit.tensor_parallel against the dense layers and the dense GPT, in float64, on 1 to 4 processes.

Every rank builds the same dense module (same seed), cuts its shard out with ``from_dense``, runs the
same batch, and compares its outputs and gradients with the dense module's (sharded the same way):
they must agree within 1e-12. One launch per world size runs every check (a launch costs a process
start); the workers return the largest differences and the parent asserts.
"""

import pytest
import torch
import torch.distributed as dist
from torch import nn

import labkit
from labkit.models import GPT, GPTConfig
from labkit.tensor_parallel import (ColumnParallelLinear, ParallelMLP, RowParallelLinear, copy_to_tensor_parallel,
                                    count_communication, gather_from_tensor_parallel, reduce_from_tensor_parallel)
from labkit.ring import chunk_bounds
from labkit.tensor_parallel_gpt import (ParallelBlock, ParallelSelfAttention, VocabParallelEmbedding, grid_groups,
                                        shard_like, tensor_parallel_gpt)

TOL = 1e-12
VOCAB, B, T = 13, 4, 16


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item() if a.numel() else 0.0


def config(world_size, **kw):
    n_head, n_embd = (3, 24) if world_size == 3 else (4, 32)
    return GPTConfig(vocab_size=VOCAB, n_layer=2, n_head=n_head, n_embd=n_embd, block_size=T, **kw)


def grads(module):
    return {n: p.grad for n, p in module.named_parameters()}


def compare_grads(errors, key, parallel, dense):
    """Every parameter of the parallel module against the same shard of the dense gradient."""
    expected = shard_like(parallel, grads(dense))
    assert set(expected) == {n for n, _ in parallel.named_parameters()}, key
    for name, p in parallel.named_parameters():
        errors[f"{key}: grad {name}"] = diff(p.grad, expected[name])


# --- f, g and gather -----------------------------------------------------------------------------------

def check_conjugate_operators(errors):
    rank, n = dist.get_rank(), dist.get_world_size()
    # f: identity forward; the gradient is summed over the ranks
    x = randn(3, 4, seed=1).requires_grad_()
    y = copy_to_tensor_parallel(x)
    errors["f forward"] = diff(y, x)
    y.backward(randn(3, 4, seed=100 + rank))
    errors["f backward"] = diff(x.grad, sum(randn(3, 4, seed=100 + s) for s in range(n)))
    # g: sum forward; the gradient passes unchanged; the input is not overwritten
    x = randn(3, 4, seed=200 + rank).requires_grad_()
    y = reduce_from_tensor_parallel(x)
    errors["g forward"] = diff(y, sum(randn(3, 4, seed=200 + s) for s in range(n)))
    errors["g leaves its input alone"] = diff(x, randn(3, 4, seed=200 + rank))
    y.backward(randn(3, 4, seed=2))
    errors["g backward"] = diff(x.grad, randn(3, 4, seed=2))
    # gather: concatenation along the last dimension forward; this rank's slice of the gradient back
    x = randn(3, 2, seed=300 + rank).requires_grad_()
    y = gather_from_tensor_parallel(x)
    errors["gather forward"] = diff(y, torch.cat([randn(3, 2, seed=300 + s) for s in range(n)], dim=-1))
    y.backward(randn(3, 2 * n, seed=3))
    errors["gather backward"] = diff(x.grad, randn(3, 2 * n, seed=3)[:, 2 * rank:2 * rank + 2])


# --- the two linear layers -----------------------------------------------------------------------------

def check_linear(errors, kind, bias, gather_output=False, parts=1):
    rank, n = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(5)
    in_f, out_f = (5, 12 * parts) if kind == "column" else (12, 5)
    dense = nn.Linear(in_f, out_f, bias=bias).double()
    x = randn(2, 3, in_f, seed=6).requires_grad_()
    weights = randn(2, 3, out_f, seed=7)                   # loss = Σ y · weights: any gradient will do
    y_dense = dense(x)
    (y_dense * weights).sum().backward()

    key = f"{kind}(bias={bias}, gather={gather_output}, parts={parts})"
    if kind == "column":
        layer = ColumnParallelLinear(dense, gather_output=gather_output, parts=parts)
        x_in = x.detach().clone().requires_grad_()
        expected_x_grad = x.grad                          # f's backward sums the ranks' contributions
    else:
        layer = RowParallelLinear(dense)
        cols = slice(rank * in_f // n, (rank + 1) * in_f // n)
        x_in = x.detach()[..., cols].clone().requires_grad_()   # the row layer takes its slice of x
        expected_x_grad = x.grad[..., cols]

    def as_output(t):
        """A dense (..., out) tensor as this rank's output: its columns, unless the output is whole."""
        if kind == "row" or gather_output:
            return t
        return layer.shard(t.movedim(-1, 0)).movedim(0, -1)

    y = layer(x_in)
    errors[f"{key}: output"] = diff(y, as_output(y_dense))
    (y * as_output(weights)).sum().backward()
    errors[f"{key}: input grad"] = diff(x_in.grad, expected_x_grad)
    compare_grads(errors, key, layer, dense)
    assert layer.weight.grad.abs().max() > 0          # a check that compares zeros would also pass


# --- the GPT's pieces and the whole GPT -------------------------------------------------------------------

def check_module(errors, key, dense, parallel):
    """A module whose output is whole on every rank (after g): output, input grad, every grad."""
    dense.zero_grad(set_to_none=True)                   # the block shares its attention and MLP
    C = dense_input_width(dense)
    x = randn(B, T, C, seed=8).requires_grad_()
    weights = randn(B, T, C, seed=9)
    (dense(x) * weights).sum().backward()
    x_in = x.detach().clone().requires_grad_()
    y = parallel(x_in)
    errors[f"{key}: output"] = diff(y, dense(x))
    (y * weights).sum().backward()
    errors[f"{key}: input grad"] = diff(x_in.grad, x.grad)
    compare_grads(errors, key, parallel, dense)


def dense_input_width(module):
    return next(m for m in module.modules() if isinstance(m, nn.Linear)).in_features


def batch(seed, size=B):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (size, T), generator=g), torch.randint(0, VOCAB, (size, T), generator=g)


def check_gpt(errors, info):
    n = dist.get_world_size()
    for flash in (False, True):
        torch.manual_seed(0)
        block = GPT(config(n, flash=flash)).double().blocks[0]
        attention = ParallelSelfAttention.from_dense(block.attn)
        check_module(errors, f"attention(flash={flash})", block.attn, attention)
    check_module(errors, "mlp", block.mlp, ParallelMLP.from_dense(block.mlp))
    check_module(errors, "block", block, ParallelBlock.from_dense(block))

    torch.manual_seed(0)
    dense = GPT(config(n)).double()
    parallel = tensor_parallel_gpt(dense)
    idx, targets = batch(10)
    with count_communication() as log:
        _, loss = parallel(idx, targets)
        loss.backward()
    _, dense_loss = dense(idx, targets)
    dense_loss.backward()
    errors["gpt: loss"] = abs(loss.item() - dense_loss.item())
    compare_grads(errors, "gpt", parallel, dense)
    info["log"] = log
    info["tied"] = parallel.lm_head.weight is parallel.wte.weight

    # a few SGD steps stay equal
    dense_opt = torch.optim.SGD(dense.parameters(), lr=0.5)
    parallel_opt = torch.optim.SGD(parallel.parameters(), lr=0.5)
    for step in range(3):
        for model, opt in ((dense, dense_opt), (parallel, parallel_opt)):
            opt.step()                            # the first step uses the gradients above
            opt.zero_grad()
            _, loss = model(*batch(20 + step))
            loss.backward()
        errors[f"sgd step {step}: loss"] = abs(loss.item() - dense(*batch(20 + step))[1].item())
    expected = shard_like(parallel, dict(dense.named_parameters()))
    for name, p in parallel.named_parameters():
        errors[f"sgd: {name}"] = diff(p.detach(), expected[name].detach())


def check_embedding(errors, info):
    """VocabParallelEmbedding against nn.Embedding, V = 10 and 11 (uneven on 3 and 4, on 2 too for 11): every
    token id once, in every shard, some twice (their rows' gradients add up); the forward on every rank, and each
    rank's rows of the gradient."""
    rank, n = dist.get_rank(), dist.get_world_size()
    for V in (10, 11):
        torch.manual_seed(V)
        dense = nn.Embedding(V, 5).double()
        parallel = VocabParallelEmbedding(dense)
        info[f"embedding {V} rows"] = (parallel.start, parallel.end, tuple(parallel.weight.shape))
        idx = torch.cat([torch.randperm(V, generator=torch.Generator().manual_seed(V)), torch.tensor([0, V - 1, 3])])
        idx = idx.view(1, -1).repeat(2, 1)
        dy = randn(*idx.shape, 5, seed=V)
        dense(idx).backward(dy)
        with count_communication() as log:
            y = parallel(idx)
            y.backward(dy)
        info[f"embedding {V} log"] = [(c.op, c.phase, c.numel) for c in log]
        errors[f"embedding {V}: forward"] = diff(y.detach(), dense(idx).detach())
        errors[f"embedding {V}: grad of rank {rank}'s rows"] = diff(parallel.weight.grad,
                                                                    dense.weight.grad[parallel.start:parallel.end])
        errors[f"embedding {V}: shard"] = diff(parallel.weight.detach(), parallel.shard(dense.weight).detach())
        if n == 1:
            errors[f"embedding {V}: shard_like"] = diff(shard_like(parallel, grads(dense))["weight"], dense.weight.grad)


def check_errors():
    """Dimensions that do not divide: a ValueError naming the dimension, raised before any collective."""
    n = dist.get_world_size()
    messages = []
    attempts = [lambda: ColumnParallelLinear(nn.Linear(4, n + 1)), lambda: RowParallelLinear(nn.Linear(n + 1, 4)),
                lambda: ColumnParallelLinear(nn.Linear(4, 3 * n * 2), parts=3, gather_output=True)]
    n_head = 4 if n == 3 else 3
    attn = GPT(GPTConfig(vocab_size=VOCAB, n_head=n_head, n_embd=12 * n_head, block_size=T)).blocks[0].attn
    attempts.append(lambda: ParallelSelfAttention.from_dense(attn))
    for attempt in attempts:
        try:
            attempt()
            messages.append(None)
        except ValueError as e:
            messages.append(str(e))
    return messages


# --- data parallel × tensor parallel ---------------------------------------------------------------------

def check_dp_tp(errors, info):
    rank = dist.get_rank()
    tp_group, dp_group = grid_groups(data_parallel=2, tensor_parallel=2)
    info["groups"] = (dist.get_process_group_ranks(tp_group), dist.get_process_group_ranks(dp_group))
    torch.manual_seed(0)
    dense = GPT(config(4)).double()
    parallel = tensor_parallel_gpt(dense, tp_group)
    idx, targets = batch(30, size=4)
    dense(idx, targets)[1].backward()                     # the dense model on the whole batch
    half = slice(2 * (rank // 2), 2 * (rank // 2) + 2)    # dp_index = rank // tp: this replica's half
    with count_communication() as log:
        parallel(idx[half], targets[half])[1].backward()
    info["dp_tp_log"] = log
    for p in parallel.parameters():                       # then data parallelism: average over dp_group
        dist.all_reduce(p.grad, group=dp_group)
        p.grad /= 2
    compare_grads(errors, "dp×tp", parallel, dense)
    try:
        grid_groups(3, 1)
    except ValueError as e:
        info["grid error"] = str(e)


def all_checks():
    torch.set_num_threads(1)
    errors, info = {}, {}
    check_conjugate_operators(errors)
    for bias in (True, False):
        for gather_output in (False, True):
            check_linear(errors, "column", bias, gather_output)
        check_linear(errors, "column", bias, parts=3)
        check_linear(errors, "row", bias)
    check_gpt(errors, info)
    check_embedding(errors, info)
    info["errors"] = check_errors() if dist.get_world_size() > 1 else []
    if dist.get_world_size() == 4:
        check_dp_tp(errors, info)
    return errors, info


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_tensor_parallel_equals_dense(world_size):
    results = labkit.launch(all_checks, world_size=world_size, timeout=60)
    for rank, (errors, info) in enumerate(results):
        assert len(errors) > 100
        too_far = {k: v for k, v in errors.items() if v > TOL}
        assert too_far == {}, f"rank {rank}"
        assert info["tied"]

        # exactly one all-reduce per f and per g: 2 per block forward (g) and 2 backward (f), B·T·C each
        cfg = config(world_size)
        log = info["log"]
        if world_size == 1:
            assert log == []                              # nothing to exchange with oneself
        else:
            numel = B * T * cfg.n_embd
            assert [(c.op, c.collective, c.phase, c.numel, c.nbytes) for c in log] == (
                [("g", "all_reduce", "forward", numel, 8 * numel)] * 2 * cfg.n_layer
                + [("f", "all_reduce", "backward", numel, 8 * numel)] * 2 * cfg.n_layer)

        # the embedding: rank r holds chunk_bounds' rows; one all-reduce (g) in forward, of B·T·d, none backward
        for V in (10, 11):
            start, end = chunk_bounds(V, world_size)[rank]
            assert info[f"embedding {V} rows"] == (start, end, (end - start, 5))
            numel = 2 * (V + 3) * 5
            assert info[f"embedding {V} log"] == ([("g", "forward", numel)] if world_size > 1 else [])

        if world_size > 1:
            column, row, gathered_parts, heads = info["errors"]
            assert f"out_features={world_size + 1} is not divisible by the group size={world_size}" in column
            assert f"in_features={world_size + 1} is not divisible by the group size={world_size}" in row
            assert "gather_output=True with parts > 1" in gathered_parts
            assert "n_head=" in heads and f"group size={world_size}" in heads

        if world_size == 4:
            tp_ranks, dp_ranks = info["groups"]
            assert tp_ranks == [2 * (rank // 2), 2 * (rank // 2) + 1]   # TP neighbours adjacent
            assert dp_ranks == [rank % 2, rank % 2 + 2]
            assert len(info["dp_tp_log"]) == 4 * cfg.n_layer
            assert all(c.numel == 2 * T * cfg.n_embd for c in info["dp_tp_log"])   # half the batch
            assert "must equal the world size 4" in info["grid error"]


def test_without_a_process_group_the_layers_are_the_dense_ones():
    torch.manual_seed(0)
    dense = GPT(config(1)).double()
    parallel = tensor_parallel_gpt(dense)
    idx, targets = batch(1)
    with count_communication() as log:
        assert torch.equal(parallel(idx, targets)[0], dense(idx, targets)[0])
    assert log == []
    reference = nn.Linear(3, 4, dtype=torch.float64)
    layer, row = ColumnParallelLinear(reference), RowParallelLinear(reference)   # one rank: all of it
    assert torch.equal(layer.weight, reference.weight) and torch.equal(layer.bias, reference.bias)
    assert torch.equal(row.weight, reference.weight) and torch.equal(row.bias, reference.bias)
    with pytest.raises(TypeError, match="ColumnParallelLinear cuts a dense nn.Linear, got Conv1d"):
        ColumnParallelLinear(nn.Conv1d(3, 4, 1))
    embedding = nn.Embedding(11, 3)
    assert torch.equal(VocabParallelEmbedding(embedding).weight, embedding.weight)
    idx = torch.tensor([[0, 10, 4]])
    assert torch.equal(VocabParallelEmbedding(embedding)(idx), embedding(idx))
