"""The pipeline runtime on real processes: every schedule gives the loss and the gradients of one process
on the whole batch, and of torch.distributed.pipelining; it measures what the schedules predict (the
activations held), runs the GPT with its tied embedding, and runs two pipelines side by side (DP x PP)."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import labkit
from labkit.models import GPT, GPTConfig
from labkit.pipeline.gpt_stages import gpt_as_sequential, gpt_loss, sum_tied_gradients
from labkit.pipeline.runtime import merge_timelines, run_schedule, split_sequential
from labkit.pipeline.schedules import COMPUTE, make_schedule
from labkit.pipeline.simulate import expected_peak_activations
from labkit.pipeline.torch_reference import torch_schedule

WIDTH, LAYERS, MB = 6, 8, 3      # 8 Linear+Tanh pairs = 16 layers; micro-batches of 3 rows


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[m for _ in range(LAYERS) for m in (nn.Linear(WIDTH, WIDTH), nn.Tanh())]).double()


def _batch(m: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m * MB, WIDTH, generator=g, dtype=torch.float64),
            torch.randn(m * MB, WIDTH, generator=g, dtype=torch.float64))


def _dense_grads(x, y):
    model = _model()
    loss = F.mse_loss(model(x), y)
    loss.backward()
    return loss.item(), [p.grad for p in model.parameters()]


def _max_diff(stages: dict, dense_grads, num_stages: int):
    """Largest difference between the stages' gradients and the same parameters' dense gradients."""
    pieces = split_sequential(_model(), num_stages)
    offsets, start = [], 0
    for piece in pieces:
        offsets.append(start)
        start += len(list(piece.parameters()))
    worst = 0.0
    for s, module in stages.items():
        for i, p in enumerate(module.parameters()):
            worst = max(worst, (p.grad - dense_grads[offsets[s] + i]).abs().max().item())
    return worst


def _schedules_on_ranks(cases, prefetch=True):
    """For each (name, m, chunks): run labkit's step; return (loss, max grad diff, peak held, action order)."""
    rank, p = dist.get_rank(), dist.get_world_size()
    out = []
    for name, m, chunks in cases:
        schedule = make_schedule(name, p, m, chunks)
        pieces = split_sequential(_model(), schedule.num_stages)
        stages = {s: pieces[s] for s in schedule.stages_of(rank)}
        x, y = _batch(m)
        result = run_schedule(schedule, stages, list(x.chunk(m)), list(y.chunk(m)), F.mse_loss,
                              activation_shape=(MB, WIDTH), dtype=torch.float64, prefetch=prefetch)
        dense_loss, dense_grads = _dense_grads(x, y)
        out.append(dict(loss=result.loss, dense_loss=dense_loss,
                        diff=_max_diff(stages, dense_grads, schedule.num_stages),
                        peak_held=result.peak_held, saved=result.peak_saved_bytes,
                        order=[e.action for e in result.events], result=result))
    return out


CASES = [("GPipe", 4, 1), ("1F1B", 4, 1), ("1F1B", 5, 1), ("GPipe", 1, 1), ("1F1B", 2, 1)]


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_every_schedule_equals_one_process(world_size):
    cases = CASES + ([("interleaved", 2 * world_size, 2)] if world_size in (2, 4) else [])
    results = labkit.launch(_schedules_on_ranks, cases, world_size=world_size, timeout=60)
    for i, (name, m, chunks) in enumerate(cases):
        per_rank = [r[i] for r in results]
        schedule = make_schedule(name, world_size, m, chunks)
        last = schedule.rank_of(schedule.num_stages - 1)
        assert per_rank[last]["loss"] == pytest.approx(per_rank[last]["dense_loss"], abs=1e-12), (name, m)
        assert all(r["loss"] is None for k, r in enumerate(per_rank) if k != last)
        assert max(r["diff"] for r in per_rank) < 1e-12, (name, m, chunks)
        # the runtime did exactly the schedule, in order
        assert all(r["order"] == list(schedule.actions[k]) for k, r in enumerate(per_rank))
        if chunks == 1:   # the measured activations held are the formula's, stage by stage
            assert [r["peak_held"] for r in per_rank] == expected_peak_activations(name, world_size, m)
    # GPipe (m=4) holds more saved bytes than 1F1B (m=4) on the first stage, by the ratio m / p
    gpipe_bytes, one_f_bytes = results[0][0]["saved"], results[0][1]["saved"]
    assert gpipe_bytes == pytest.approx(one_f_bytes * 4 / min(world_size, 4), rel=0.01)
    timeline = merge_timelines([r[1]["result"] for r in results])
    assert timeline.num_ranks == world_size and timeline.makespan > 0
    assert sum(1 for e in timeline.events if e.action.kind in COMPUTE) == 2 * 4 * world_size


def test_the_plain_interpreter_without_the_speed_ups_gives_the_same_step():
    """prefetch=False: receives posted when the schedule reaches them, sends held to the end; same numbers."""
    cases = [("1F1B", 5, 1), ("interleaved", 4, 2)]
    plain = labkit.launch(_schedules_on_ranks, cases, False, world_size=2, timeout=60)
    fast = labkit.launch(_schedules_on_ranks, cases, True, world_size=2, timeout=60)
    for i in range(len(cases)):
        for rank in range(2):
            a, b = plain[rank][i], fast[rank][i]
            assert a["loss"] == b["loss"] and a["diff"] < 1e-12 and a["order"] == b["order"]
            assert a["peak_held"] == b["peak_held"]


def _torch_and_labkit(name: str, m: int):
    rank, p = dist.get_rank(), dist.get_world_size()
    x, y = _batch(m)
    grads = {}
    for who in ("labkit", "torch"):
        piece = split_sequential(_model(), p)[rank]
        if who == "labkit":
            run_schedule(make_schedule(name, p, m), {rank: piece}, list(x.chunk(m)), list(y.chunk(m)), F.mse_loss,
                         activation_shape=(MB, WIDTH), dtype=torch.float64)
        else:
            schedule = torch_schedule(name, piece, m, F.mse_loss, x[:MB] if rank == 0 else torch.zeros(MB, WIDTH,
                                                                                                   dtype=torch.float64))
            if rank == 0:
                schedule.step(x)
            elif rank == p - 1:
                schedule.step(target=y, losses=[])
            else:
                schedule.step()
        grads[who] = [q.grad.clone() for q in piece.parameters()]
    return max((a - b).abs().max().item() for a, b in zip(grads["labkit"], grads["torch"]))


@pytest.mark.parametrize("name", ["GPipe", "1F1B"])
def test_same_gradients_as_torch_pipelining(name):
    diffs = labkit.launch(_torch_and_labkit, name, 6, world_size=3, timeout=60)
    assert max(diffs) < 1e-12


def _gpt_pipeline(name: str, m: int):
    rank, p = dist.get_rank(), dist.get_world_size()
    config = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)
    torch.manual_seed(0)
    model = GPT(config).double()
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 11, (2 * m, 8), generator=g)
    targets = torch.randint(0, 11, (2 * m, 8), generator=g)
    pieces = split_sequential(gpt_as_sequential(model), p)
    result = run_schedule(make_schedule(name, p, m), {rank: pieces[rank]}, list(idx.chunk(m)),
                          list(targets.chunk(m)), gpt_loss, activation_shape=(2, 8, 8), dtype=torch.float64)
    tied = model.wte.weight
    if p > 1 and rank in (0, p - 1):
        sum_tied_gradients(tied, peer=p - 1 - rank)
    torch.manual_seed(0)
    dense = GPT(config).double()
    _, loss = dense(idx, targets)
    loss.backward()
    names = {q: n for n, q in model.named_parameters()}
    dense_grads = dict(dense.named_parameters())
    diff = max((q.grad - dense_grads[names[q]].grad).abs().max().item() for q in pieces[rank].parameters())
    return diff, result.loss, loss.item()


@pytest.mark.parametrize("world_size", [1, 4])
def test_the_gpt_in_stages_with_its_tied_embedding(world_size):
    results = labkit.launch(_gpt_pipeline, "1F1B", 4, world_size=world_size, timeout=60)
    assert max(r[0] for r in results) < 1e-12
    assert results[-1][1] == pytest.approx(results[-1][2], abs=1e-12)


def _data_times_pipeline():
    """4 ranks = 2 pipelines ({0, 1}, {2, 3}) of 2 stages; stage s of both pipelines averages gradients."""
    rank = dist.get_rank()
    replica, stage = divmod(rank, 2)
    dp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]   # every rank creates every group
    m = 4
    x, y = _batch(2 * m)
    xs, ys = x.chunk(2)[replica], y.chunk(2)[replica]              # each pipeline: half of the batch
    piece = split_sequential(_model(), 2)[stage]
    run_schedule(make_schedule("1F1B", 2, m), {stage: piece}, list(xs.chunk(m)), list(ys.chunk(m)), F.mse_loss,
                 activation_shape=(MB, WIDTH), dtype=torch.float64, ranks=[2 * replica, 2 * replica + 1])
    for q in piece.parameters():
        dist.all_reduce(q.grad, group=dp_groups[stage])
        q.grad /= 2
    _, dense_grads = _dense_grads(x, y)
    return _max_diff({stage: piece}, dense_grads, 2)


def test_data_parallel_times_pipeline_parallel():
    assert max(labkit.launch(_data_times_pipeline, world_size=4, timeout=60)) < 1e-12


def _bad_call(kind: str):
    schedule = make_schedule("GPipe", 2, 2)
    piece = split_sequential(_model(), 2)[dist.get_rank()]
    x, y = _batch(2)
    if kind == "stages":
        run_schedule(schedule, {0: piece, 1: piece}, list(x.chunk(2)), list(y.chunk(2)), F.mse_loss,
                     activation_shape=(MB, WIDTH))
    elif kind == "inputs":
        run_schedule(schedule, {dist.get_rank(): piece}, None, list(y.chunk(2)), F.mse_loss,
                     activation_shape=(MB, WIDTH))
    elif kind == "ranks":
        run_schedule(schedule, {dist.get_rank(): piece}, list(x.chunk(2)), list(y.chunk(2)), F.mse_loss,
                     activation_shape=(MB, WIDTH), ranks=[0, 1, 2])


@pytest.mark.parametrize("kind,message", [("stages", "holds stages \\[[01]\\] in GPipe, but was given stages \\[0, 1\\]"),
                                          ("inputs", "needs the 2 input micro-batches"),
                                          ("ranks", "names 3 processes for a pipeline of 2 ranks")])
def test_bad_calls_say_what_is_wrong(kind, message):
    with pytest.raises(labkit.WorkerError, match=message):
        labkit.launch(_bad_call, kind, world_size=2, timeout=20)


def _saved_bytes(clone: bool):
    rank = dist.get_rank()
    torch.manual_seed(0)
    stage = nn.Linear(8, 8).double()            # saves its input: 2 rows x 8 float64 = 128 bytes per micro-batch
    x, y = torch.randn(8, 8, dtype=torch.float64), torch.randn(8, 8, dtype=torch.float64)
    xs, ys = x.chunk(4), y.chunk(4)             # views of one storage each
    if clone:
        xs, ys = [t.clone() for t in xs], [t.clone() for t in ys]
    return run_schedule(make_schedule("GPipe", 2, 4), {rank: stage}, xs, ys, F.mse_loss, activation_shape=(2, 8),
                        dtype=torch.float64).peak_saved_bytes


def test_saved_bytes_count_a_views_own_elements():
    # stage 0 holds 4 inputs of 128 bytes; the last stage 4 x (its input, its output, the target)
    assert labkit.launch(_saved_bytes, False, world_size=2) == [4 * 128, 4 * 3 * 128]
    assert labkit.launch(_saved_bytes, True, world_size=2) == [4 * 128, 4 * 3 * 128]


def _sent_tensors_alive():
    """At each forward of stage 0 in 1F1B, how many tensors this rank sent are still alive."""
    import weakref

    from labkit import comm
    sent, isend = [], comm.isend

    def recording_isend(tensor, *args, **kwargs):
        sent.append(weakref.ref(tensor))
        return isend(tensor, *args, **kwargs)

    class Probe(nn.Linear):
        def forward(self, x):
            alive.append(sum(r() is not None for r in sent))
            return super().forward(x)

    comm.isend, alive = recording_isend, []
    try:
        rank = dist.get_rank()
        torch.manual_seed(0)
        m = 8
        xs, ys = [torch.randn(4, 16) for _ in range(m)], [torch.randn(4, 16) for _ in range(m)]
        run_schedule(make_schedule("1F1B", 2, m), {rank: Probe(16, 16)}, xs, ys, F.mse_loss, activation_shape=(4, 16))
    finally:
        comm.isend = isend
    return alive


def test_sent_activations_are_released_once_their_gradient_is_back():
    # 1F1B on 2 stages: stage 0 has at most one activation in flight when it starts a forward (the one
    # whose gradient it has not received yet); keeping every send until the end would give 0, 1, ..., 7
    alive = labkit.launch(_sent_tensors_alive, world_size=2, timeout=30)[0]
    assert max(alive) == 1 and len(alive) == 8
