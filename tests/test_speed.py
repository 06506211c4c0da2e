"""labkit.speed: the switches' defaults, and compiling block by block keeps the gradient hooks early."""

import pytest
import torch
from torch import nn

from labkit import speed
from labkit.labs import train_gpt
from labkit.models.gpt import GPT, GPTConfig


def _a_gpu(monkeypatch, capability: tuple, triton: bool = True, name: str = "GPU"):
    """torch.cuda answering for a GPU of this compute capability (no GPU needed)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(speed, "_triton_installed", lambda: triton)
    return torch.device("cuda")


def test_defaults_all_off_on_cpu():
    assert speed.default_switches(torch.device("cpu")) == speed.Switches()
    assert speed.compile_problem(torch.device("cpu")) is None
    assert speed.adamw_options(speed.Switches()) == {}


@pytest.mark.parametrize("capability, triton, on", [
    ((9, 0), True, ("bfloat16", True, True, True, True)),        # H100, H200
    ((8, 0), False, ("bfloat16", True, True, False, True)),      # an A100 without Triton (Windows)
    ((7, 5), True, ("float32", False, True, True, True)),        # T4: bf16 emulated, no TF32
    ((6, 0), True, ("float32", False, True, False, True)),       # P100: too old for Triton
])
def test_defaults_on_a_gpu_are_what_it_supports(monkeypatch, capability, triton, on):
    gpu = speed.default_switches(_a_gpu(monkeypatch, capability, triton))
    assert (gpu.dtype, gpu.tf32, gpu.flash, gpu.compile, gpu.fused_optimizer) == on
    assert speed.adamw_options(gpu) == {"fused": True}


def test_compile_asked_where_it_cannot_run_is_refused_before_training(monkeypatch):
    device = _a_gpu(monkeypatch, (6, 0), name="Tesla P100-PCIE-16GB")
    problem = speed.compile_problem(device)
    assert "Tesla P100-PCIE-16GB" in problem and "6.0" in problem and "7.0" in problem
    with pytest.raises(ValueError, match="--compile: the Tesla P100.*--no-compile"):
        train_gpt.resolve_switches(train_gpt.parse_args(["--compile"]), device)
    args = train_gpt.parse_args([])
    assert not train_gpt.resolve_switches(args, device).compile and args.compile is False   # the default
    assert "not installed" in speed.compile_problem(_a_gpu(monkeypatch, (9, 0), triton=False))
    resumed = train_gpt.parse_args(["--compile"])
    resumed.resume = "runs/a_run"              # compile taken from that run's checkpoint: say where it came from
    with pytest.raises(ValueError, match=r"--compile \(as in the checkpoint of --resume runs/a_run\): .*--no-compile"):
        train_gpt.resolve_switches(resumed, device)


class _Probe(nn.Module):
    """Eager code around block 0: notes when the gradient of its output arrives, i.e. when block 0's
    backward is about to start."""

    def __init__(self, block, events):
        super().__init__()
        self.block, self.events = block, events

    def forward(self, x):
        y = self.block(x)
        y.register_hook(lambda g: self.events.append("block 0's backward starts"))
        return y


def test_compiled_blocks_let_the_last_blocks_gradient_hooks_fire_before_the_first_blocks_backward():
    # What labkit's DDPs need from --compile: a bucket's all-reduce starts from a gradient hook, and it
    # overlaps the backward only if the hooks of the last block fire before the first block's backward.
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=3, n_head=2, n_embd=16))
    names = [name for name, _ in model.named_parameters()]
    speed.compile_blocks(model, speed.Switches(compile=True))
    assert [name for name, _ in model.named_parameters()] == names, "compiling renamed the parameters"
    events = []
    for p in model.blocks[-1].parameters():
        p.register_post_accumulate_grad_hook(lambda p: events.append("last block's gradient"))
    model.blocks[0] = _Probe(model.blocks[0], events)
    idx = torch.randint(0, 11, (2, 8))
    _, loss = model(idx, idx)
    loss.backward()
    start = events.index("block 0's backward starts")
    assert events[:start].count("last block's gradient") == len(list(model.blocks[-1].parameters())), events
    assert all(p.grad is not None for p in model.parameters())


def test_compile_blocks_does_nothing_when_the_switch_is_off():
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16))
    speed.compile_blocks(model, speed.Switches())
    assert all(getattr(block, "_compiled_call_impl", None) is None for block in model.blocks)


def test_peak_memory_on_a_cpu_without_the_resource_module(monkeypatch):
    # Windows has no `resource`: the peak working set (psutil), or 0 said as unknown; labkit.speed still imports
    import psutil
    linux = speed.peak_memory_bytes(torch.device("cpu"))
    assert linux[0] > 2 ** 20 and linux[1] == "the process's peak resident memory"
    monkeypatch.setattr(speed, "resource", None)
    monkeypatch.setattr(psutil.Process, "memory_info", lambda self: type("Windows", (), {"peak_wset": 123})())
    assert speed.peak_memory_bytes(torch.device("cpu")) == (123, "the process's peak working set")
    monkeypatch.setattr(psutil.Process, "memory_info", lambda self: object())           # no peak_wset: not Windows
    assert speed.peak_memory_bytes(torch.device("cpu"))[0] == 0
