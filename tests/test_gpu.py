"""The GPU check: every communication path, DDP and lab on CUDA with NCCL, at the world sizes one
machine allows (NCCL: one process per GPU; several processes sharing a GPU run gloo).

    python3 course.py test -m gpu        # skipped cleanly where there is no CUDA GPU

Each test launches its own workers, so the kernel-side state a lesson leaves behind (a CUDA query,
a backward pass on the GPU) is set up first, as a notebook would have it.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import labkit
from labkit import comm
from labkit.launcher import gpu_count

GPUS = gpu_count()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPUS == 0, reason="needs a CUDA GPU")]
ROOT = Path(__file__).resolve().parents[1]
NCCL_WORLDS = [n for n in (1, 2, 4) if n <= GPUS]


@pytest.fixture(scope="module", autouse=True)
def caller_used_cuda_and_autograd():
    """What a lesson's kernel has done before it launches: CUDA initialised, a backward pass on the GPU."""
    x = torch.randn(16, device="cuda", requires_grad=True)
    (x * x).sum().backward()
    torch.cuda.synchronize()
    assert torch.cuda.is_initialized()


# --- launch ---------------------------------------------------------------------------------------

def _cuda_step():
    dev = torch.device("cuda", torch.cuda.current_device())
    w = nn.Parameter(torch.ones(4, device=dev))
    opt = torch.optim.Adam([w], lr=0.1)
    (w * torch.arange(4.0, device=dev)).sum().backward()
    opt.step()
    t = comm.on(torch.tensor([float(dist.get_rank() + 1)]))
    comm.all_reduce(t)
    return dist.get_backend(), str(t.device), t.item(), w.detach().cpu().tolist()


@pytest.mark.parametrize("world_size", NCCL_WORLDS)
def test_launch_on_cuda_after_the_caller_used_cuda(world_size):
    out = labkit.launch(_cuda_step, world_size=world_size, device="cuda")
    for rank, (backend, device, total, w) in enumerate(out):
        assert backend == "nccl" and device == f"cuda:{rank}"
        assert total == world_size * (world_size + 1) / 2
        assert w == pytest.approx([1.0, 0.9, 0.9, 0.9])


def _cpu_step_beside_a_gpu():
    w = nn.Parameter(torch.ones(4))
    opt = torch.optim.Adam([w], lr=0.1)
    (w * torch.arange(4.0)).sum().backward()
    opt.step()                        # torch.optim queries CUDA here: it must not fail in a worker
    return w.detach().tolist()


def test_cpu_workers_run_autograd_and_optimizers_after_the_caller_used_the_gpu():
    assert labkit.launch(_cpu_step_beside_a_gpu, world_size=4) == [pytest.approx([1.0, 0.9, 0.9, 0.9])] * 4


def test_asking_for_more_gpus_than_there_are_is_a_clear_error():
    with pytest.raises(ValueError, match="one GPU per process"):
        labkit.launch(_cuda_step, world_size=GPUS + 1, device="cuda")


# --- the communication layer and the collectives ----------------------------------------------------

def _collectives_on_the_group_device():
    from labkit import collectives as C
    rank, n = dist.get_rank(), dist.get_world_size()
    dev = comm.device()
    x = torch.arange(6.0, device=dev) + rank
    want = x.clone()
    comm.all_reduce(want)
    got = {name: fn(x.clone()) for name, fn in [("ring", C.ring_all_reduce), ("tree", C.tree_all_reduce),
                                                ("naive", C.naive_all_reduce)]}
    gathered = torch.empty(n * 6, device=dev)
    comm.all_gather_into_tensor(gathered, x)
    scattered = torch.empty(6, device=dev)
    comm.reduce_scatter_tensor(scattered, torch.ones(6 * n, device=dev))
    comm.broadcast(x, src=0)
    comm.barrier()
    try:
        comm.all_reduce(torch.ones(2))        # a CPU tensor in an NCCL collective
        wrong = "no error"
    except ValueError as exc:
        wrong = str(exc)
    return ({k: torch.equal(v, want) for k, v in got.items()}, gathered.device.type, scattered.tolist(),
            x.tolist(), wrong)


@pytest.mark.parametrize("world_size", NCCL_WORLDS)
def test_collectives_and_the_device_rule_under_nccl(world_size):
    for rank, (equal, where, scattered, x, wrong) in enumerate(
            labkit.launch(_collectives_on_the_group_device, world_size=world_size, device="cuda")):
        assert equal == {"ring": True, "tree": True, "naive": True}
        assert where == "cuda" and scattered == [float(world_size)] * 6 and x == [float(i) for i in range(6)]
        assert f"rank {rank}: all_reduce got a tensor of shape (2,) on cpu" in wrong and "(nccl)" in wrong


# --- the DDPs ------------------------------------------------------------------------------------------

def _tiny_gpt(dev):
    from labkit.models import GPT, GPTConfig
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32)).to(dev)


def _ddp_grads(kind):
    from torch.nn.parallel import DistributedDataParallel

    from labkit.ddp import BucketedDDP, NaiveDDP, OverlapDDP
    dev = comm.device()
    rank, n = dist.get_rank(), dist.get_world_size()
    idx = torch.randint(0, 32, (4 * n, 16), generator=torch.Generator().manual_seed(1)).to(dev)
    reference = _tiny_gpt(dev)
    reference(idx[:, :-1], idx[:, 1:])[1].backward()           # one process, the whole batch
    model = _tiny_gpt(dev)
    wrap = {"naive": NaiveDDP, "overlap": OverlapDDP, "bucketed": BucketedDDP,
            "torch": lambda m: DistributedDataParallel(m, device_ids=[dev.index] if dev.type == "cuda" else None)}[kind]
    ddp = wrap(model)
    mine = idx[4 * rank:4 * rank + 4]
    ddp(mine[:, :-1], mine[:, 1:])[1].backward()         # labkit's DDPs finish when backward ends
    return max((p.grad - q.grad).abs().max().item() for p, q in zip(model.parameters(), reference.parameters()))


@pytest.mark.parametrize("kind", ["naive", "overlap", "bucketed", "torch"])
@pytest.mark.parametrize("world_size", NCCL_WORLDS)
def test_each_ddp_equals_one_process_under_nccl(kind, world_size):
    errors = labkit.launch(_ddp_grads, kind, world_size=world_size, device="cuda")
    assert max(errors) < 1e-5, errors


# --- lesson 8: ZeRO, FSDP and the memory prediction on the GPU ------------------------------------------------

@pytest.mark.parametrize("strategy", ["ddp", "zero1", "zero2", "fsdp", "torch_zero1", "torch_fsdp"])
@pytest.mark.parametrize("world_size", NCCL_WORLDS)
def test_each_sharding_equals_one_process_under_nccl(strategy, world_size):
    from labkit.models import GPTConfig
    from labkit.sharded_step import train

    config = GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32)
    reference = train("single", config, batch=2 * world_size)
    results = labkit.launch(train, strategy, config, batch=2, world_size=world_size, device="cuda", timeout=120)
    for result in results:
        for name, want in reference.params.items():
            assert torch.allclose(result.params[name].cpu(), want, rtol=1e-10, atol=1e-12), (strategy, name)
        assert result.cuda_peak > 0


def test_the_memory_prediction_against_the_cuda_allocator():
    """What a step keeps is the prediction (counted the same way as on CPU); the allocator's peak in the step is
    at least that and at most the prediction plus the backward's temporaries."""
    from labkit.memory import Setup, predict
    from labkit.models import GPTConfig
    from labkit.sharded_step import train

    config = GPTConfig(vocab_size=128, block_size=128, n_layer=4, n_head=4, n_embd=128)
    result = labkit.launch(train, "ddp", config, batch=8, dtype=torch.float32, world_size=1, device="cuda")[0]
    want = predict(config, Setup(batch=8, seq_len=128))
    assert result.memory.as_dict() == pytest.approx(want.as_dict())
    print(f"predicted {want.total / 2 ** 20:.1f} MiB, cuda peak {result.cuda_peak / 2 ** 20:.1f} MiB")
    assert want.total <= result.cuda_peak < 2 * want.total


# --- lesson 9: compression hooks, local SGD and the emulated network under NCCL -----------------------------------

@pytest.mark.parametrize("method", ["bf16", "topk", "powersgd-r1", "diloco-4"])
@pytest.mark.parametrize("world_size", NCCL_WORLDS)
def test_each_remedy_trains_under_nccl(method, world_size):
    from labkit.compressed_training import VOCAB_SIZE, train
    from labkit.models import GPTConfig
    from labkit.network import Link, Network

    config = GPTConfig(vocab_size=VOCAB_SIZE, block_size=16, n_layer=1, n_head=2, n_embd=32)
    net = Network(inside=Link(alpha=1e-4, bandwidth=1e9))
    runs = labkit.launch(train, method, config, steps=8, network=net, world_size=world_size, device="cuda",
                         timeout=120)
    assert runs[0].losses[-1] < runs[0].losses[0]
    assert runs[0].bytes[-1] > 0 or world_size == 1                  # one rank sends nothing
    assert all(torch.allclose(r.params, runs[0].params, atol=1e-5) for r in runs)


# --- lesson 10: exact resume, sharded checkpoints and the preflight under NCCL --------------------------------------

@pytest.mark.parametrize("world_size", NCCL_WORLDS)
def test_a_resume_on_the_gpu_ends_on_the_uninterrupted_bits(world_size, tmp_path):
    from labkit.resumable import resume_each

    # checkpoints loaded onto the GPU (map_location=cuda): the random states come back from there
    differences = labkit.launch(resume_each, tmp_path, 12, 4, 7, world_size=world_size, device="cuda", timeout=120)[0]
    assert differences["nothing"] == 0.0
    assert differences["optimizer state"] > 0 and differences["random states"] > 0


@pytest.mark.parametrize("world_size", NCCL_WORLDS)
def test_sharded_checkpoint_and_preflight_under_nccl(world_size, tmp_path):
    from labkit import preflight, sharded_checkpoint
    from labkit.compressed_training import VOCAB_SIZE
    from labkit.models import GPTConfig

    config = GPTConfig(vocab_size=VOCAB_SIZE, block_size=8, n_layer=2, n_head=2, n_embd=16)
    saved, _ = labkit.launch(sharded_checkpoint.train_and_save, str(tmp_path / "dcp"), 2, config,
                             world_size=world_size, device="cuda", timeout=120)[0]
    loaded, _ = labkit.launch(sharded_checkpoint.load_and_continue, str(tmp_path / "dcp"), 2, config,
                              world_size=world_size, device="cuda", timeout=120)[0]
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    problems, reports = labkit.launch(preflight.run, world_size=world_size, device="cuda", timeout=60)[0]
    assert problems == [] and reports[0]["backend"] == "nccl"


# --- tensor parallel, pipeline, parameter server ------------------------------------------------------------

def _tensor_parallel_gpt():
    from labkit.tensor_parallel_gpt import tensor_parallel_gpt
    dev = comm.device()
    dense = _tiny_gpt(dev).double()
    parallel = tensor_parallel_gpt(dense)
    idx = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(2)).to(dev)
    a, b = dense(idx)[0], parallel(idx)[0]
    return (a - b).abs().max().item()


@pytest.mark.parametrize("world_size", NCCL_WORLDS)
def test_tensor_parallel_gpt_equals_the_dense_one_under_nccl(world_size):
    assert max(labkit.launch(_tensor_parallel_gpt, world_size=world_size, device="cuda")) < 1e-10


def _pipeline(name, p):
    from labkit.pipeline import make_schedule, run_schedule
    dev = comm.device()
    torch.manual_seed(0)
    layers = [nn.Linear(8, 8, dtype=torch.float64, device=dev) for _ in range(p)]
    xs = [torch.randn(2, 8, dtype=torch.float64) for _ in range(4)]
    ys = [torch.randn(2, 8, dtype=torch.float64) for _ in range(4)]
    rank = dist.get_rank()
    result = run_schedule(make_schedule(name, p, 4), {rank: layers[rank]}, xs, ys, F.mse_loss,
                          activation_shape=(2, 8), dtype=torch.float64)
    grads = [q.grad.clone() for q in layers[rank].parameters()]
    whole = nn.Sequential(*layers)
    whole.zero_grad(set_to_none=True)
    F.mse_loss(whole(torch.cat(xs).to(dev)), torch.cat(ys).to(dev)).backward()
    return result.losses, max((g - q.grad).abs().max().item() for g, q in zip(grads, layers[rank].parameters()))


@pytest.mark.parametrize("name", ["GPipe", "1F1B"])
def test_a_one_stage_pipeline_runs_on_cuda(name):
    [(losses, error)] = labkit.launch(_pipeline, name, 1, world_size=1, device="cuda")
    assert len(losses) == 4 and error < 1e-12


def _pipeline_refuses_nccl():
    try:
        _pipeline("1F1B", dist.get_world_size())
    except RuntimeError as exc:
        return str(exc)
    return "ran"


@pytest.mark.skipif(GPUS < 2, reason="NCCL with two ranks needs two GPUs")
def test_the_pipeline_runtime_refuses_nccl_instead_of_deadlocking():
    out = labkit.launch(_pipeline_refuses_nccl, world_size=2, device="cuda")
    assert all("torch_reference" in o for o in out)


def _ps_model():
    from labkit.data_parallel import LinearRegression
    torch.manual_seed(0)
    return LinearRegression(8, dtype=torch.float64).to("cuda")   # workers compute on the GPU


def _ps_batch(worker, step):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(8, 8, generator=g, dtype=torch.float64)
    return x.chunk(2)[worker].cuda(), x.sum(1, keepdim=True).chunk(2)[worker].cuda()


def _ps_loss(model, xb, yb):
    return model.loss(xb, yb)


def test_parameter_server_with_workers_on_the_gpu():
    from labkit.param_server import train
    run = train(_ps_model, _ps_batch, _ps_loss, workers=2, servers=1, mode="sync", steps=3, lr=0.1)
    # the same steps in one process: the mean of the two halves' gradients is the whole batch's
    model = _ps_model()
    for step in range(3):
        model.zero_grad()
        xs, ys = zip(*(_ps_batch(w, step) for w in range(2)))
        sum(_ps_loss(model, x, y) for x, y in zip(xs, ys)).div(2).backward()
        with torch.no_grad():
            for q in model.parameters():
                q -= 0.1 * q.grad
    want = torch.cat([q.detach().reshape(-1) for q in model.parameters()]).cpu()
    assert torch.allclose(run.params, want, atol=1e-12)


# --- the labs under torchrun and accelerate --------------------------------------------------------------

def _run(cmd, timeout=240):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
# --no-compile: compiling takes a minute per run; the speed switches have a test of their own below
GPT_ARGS = ["--world-size", "1", "--preset", "tiny", "--steps", "6", "--eval-every", "0", "--batch-size", "4",
            "--no-compile"]


@pytest.mark.parametrize("ddp", ["naive", "overlap", "bucketed", "torch"])
def test_gpt_lab_under_torchrun_with_each_ddp(ddp, tmp_path):
    out = _run(TORCHRUN + ["-m", "labkit.labs.train_gpt", *GPT_ARGS, "--ddp", ddp, "--out-dir", str(tmp_path)])
    assert "nccl" in out and "cuda" in out, out[-2000:]


@pytest.mark.parametrize("ddp", ["naive", "overlap", "bucketed", "torch"])
def test_gpt_lab_under_accelerate_with_each_ddp(ddp, tmp_path):
    out = _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/gpu.yaml",
                "--num_processes", "1", "-m", "labkit.labs.train_gpt", *GPT_ARGS, "--ddp", ddp,
                "--out-dir", str(tmp_path)])
    assert "nccl" in out and "cuda" in out, out[-2000:]


def test_dp_sgd_lab_under_torchrun():
    out = _run(TORCHRUN + ["-m", "labkit.labs.dp_sgd", "--world-size", "1", "--epochs", "2"])
    assert "nccl on cuda" in out, out[-2000:]


def test_large_batch_lab_under_torchrun(tmp_path):
    out = _run(TORCHRUN + ["-m", "labkit.labs.large_batch", "--world-size", "1", "--methods", "adam", "lamb",
                           "adascale", "--scales", "1", "2", "--epochs", "0.05", "--eval-points", "2", "--no-figure",
                           "--no-progress", "--output", str(tmp_path / "sweep.json")], timeout=400)
    assert (tmp_path / "sweep.json").exists(), out[-2000:]


# --- speed (labkit.speed, labkit.optim.lamb_fused) ----------------------------------------------------------

def test_gpt_lab_with_every_speed_switch_on_the_gpu(tmp_path):
    """The GPU defaults (bf16, TF32, flash, compile, fused AdamW) under torchrun: it trains, compiles a
    few graphs, and prints tokens/s, both MFUs and the allocator's peak."""
    out = _run(TORCHRUN + ["-m", "labkit.labs.train_gpt", "--world-size", "1", "--preset", "small", "--steps", "12",
                           "--eval-every", "0", "--batch-size", "16", "--out-dir", str(tmp_path)], timeout=400)
    import json
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["switches"] == dict(dtype="bfloat16", tf32=True, flash=True, compile=True, fused_optimizer=True)
    assert 1 <= metrics["compiled_graphs"] <= 4, metrics["compiled_graphs"]
    assert metrics["train_loss"][-1] < metrics["train_loss"][0] - 0.5
    assert 0 < metrics["mfu_of_measured"] < 1 and metrics["peak_memory_source"] == "torch.cuda.max_memory_allocated"
    assert "of the data sheet" in out or "not in labkit.speed's table" in out, out[-2000:]


def test_fused_lamb_equals_the_readable_one_on_the_gpu_in_float32():
    from labkit.optim import Lamb
    from labkit.optim.lamb_fused import compile_units
    torch.manual_seed(0)
    # four repeated blocks of four tensors between two others: two calls of two blocks each, one for the rest
    shapes = [(3, 5)] + [(1024, 768), (768,), (4096, 1024), (1024,)] * 4 + [(768,)]
    base = [torch.randn(s, device="cuda") for s in shapes]
    assert [len(call) for call in compile_units(base)] == [8, 8, 2]
    grads = [[torch.randn(s, device="cuda") * 1e-2 for s in shapes] for _ in range(5)]
    results = {}
    for path in (dict(fused=True), dict(foreach=False)):
        params = [nn.Parameter(p.clone()) for p in base]
        opt = Lamb(params, lr=1e-2, weight_decay=0.01, **path)
        for step in range(5):
            for p, g in zip(params, grads[step]):
                p.grad = g
            opt.step()
        results[path.get("fused", False)] = params
        assert opt.fused == path.get("fused", False), "the fused path fell back to foreach: nothing compiled was tested"
    for i, (fused, readable, start) in enumerate(zip(results[True], results[False], base)):
        moved = (readable.detach() - start).abs().max()
        error = (fused.detach() - readable.detach()).abs().max()
        assert error <= 1e-4 * moved, f"tensor {i}: fused and readable differ by {error:.2e}, moved {moved:.2e}"


def test_fused_lamb_compiled_in_bfloat16_is_the_float64_step_rounded():
    from lamb_numerics import assert_step_close, float64_step
    from labkit.optim import Lamb
    torch.manual_seed(0)
    hyper = dict(lr=0.05, weight_decay=0.1)
    shapes = [(1024, 768), (768,), (3, 5), (4096, 1024)]
    params = [nn.Parameter((torch.randn(s, device="cuda") * 0.1).bfloat16()) for s in shapes]
    grads = [(torch.randn(s, device="cuda") * 1e-2).bfloat16() for s in shapes]
    before = [p.detach().clone() for p in params]
    reference, reference_ratios = float64_step(before, grads, **hyper)
    for p, g in zip(params, grads):
        p.grad = g
    opt = Lamb(params, fused=True, **hyper)
    opt.step()
    assert opt.fused, "the fused path fell back to foreach: nothing compiled was tested"
    ratios = torch.stack([opt.state[p]["trust_ratio"] for p in params]).double()
    torch.testing.assert_close(ratios, torch.stack(reference_ratios), rtol=4 * 2 ** -7, atol=0)
    assert_step_close(before, [p.detach() for p in params], reference, torch.bfloat16)
