"""labkit.speed: the switches' defaults, and compiling block by block keeps the gradient hooks early."""

import torch
from torch import nn

from labkit import speed
from labkit.models.gpt import GPT, GPTConfig


def test_defaults_all_on_for_gpus_all_off_on_cpu():
    assert speed.default_switches(torch.device("cpu")) == speed.Switches()
    gpu = speed.default_switches(torch.device("cuda"))
    assert (gpu.dtype, gpu.tf32, gpu.flash, gpu.compile, gpu.fused_optimizer) == ("bfloat16", True, True, True, True)
    assert speed.adamw_options(gpu) == {"fused": True} and speed.adamw_options(speed.Switches()) == {}


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
