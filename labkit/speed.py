"""What the GPT lab turns on for speed, in one place: each switch, why it helps, how it is measured.

A training step's time goes to three things: the matrix multiplies (the FLOPs the model needs), the
memory traffic of everything else (LayerNorm, GELU, softmax, residual adds, the optimizer: a few
flops per number moved), and overheads (Python, kernel launches, waiting for data or messages).
Model FLOPs utilisation (MFU) = the FLOPs the model needs per second / the device's peak: only the
first kind of time counts as useful. Each switch attacks one of the others:

    switch            option                what it changes
    bf16 autocast     --dtype bfloat16      matrix multiplies on bf16 tensor cores (up to ~16x fp32's
                                            rate on an H100); fp32 master weights, gradients and
                                            optimizer state stay (lesson 8)
    TF32              --tf32                matrix multiplies still in fp32 use tensor cores with a
                                            10-bit mantissa (whatever autocast leaves in fp32)
    flash attention   --flash               F.scaled_dot_product_attention: softmax(QKᵀ)V in one kernel
                                            that never writes the T×T matrix to memory
    torch.compile     --compile             fuses the elementwise work between matrix multiplies into a
                                            few kernels (one read and one write instead of one per op)
                                            and cuts Python overhead; block by block, so that the
                                            gradients' all-reduces still overlap the backward
    fused optimizer   --fused-optimizer     AdamW(fused=True): one kernel over all parameters instead
                                            of a dozen passes (labkit.bench.optim measures it)
    a full batch      --batch-size, --grad-accum   enough tokens per kernel to fill the device; gradient
                                            accumulation keeps the global batch when memory runs out

The lab prints tokens/s, MFU against the data-sheet peak and against the matrix rate measured on the
device itself (:func:`measured_matmul_flops`), and the peak memory. ``python -m labkit.bench.speed``
turns the switches on one at a time and records what each gives.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import time
from dataclasses import dataclass

import torch

try:
    import resource            # the peak resident memory on Linux and macOS
except ImportError:            # Windows
    resource = None

__all__ = ["Switches", "default_switches", "compile_problem", "set_tf32", "autocast", "compile_blocks",
           "adamw_options", "PEAK_BF16_TFLOPS", "datasheet_peak_flops", "measured_matmul_flops", "peak_memory_bytes",
           "reset_peak_memory"]


@dataclass
class Switches:
    """The speed switches of one run (see the module's table)."""
    dtype: str = "float32"            # "bfloat16": autocast to bf16 around forward and loss
    tf32: bool = False
    flash: bool = False
    compile: bool = False
    fused_optimizer: bool = False

    def describe(self) -> str:
        on = [name for name in ("tf32", "flash", "compile", "fused_optimizer") if getattr(self, name)]
        return f"{self.dtype}" + (", " + ", ".join(on) if on else "")


def default_switches(device: torch.device) -> Switches:
    """On a GPU everything it supports on; on a CPU everything off, so that what the lessons print on a
    laptop stays plain float32 PyTorch's (bf16 would change those digits, and compiling takes seconds).

    bf16 and TF32 need an Ampere GPU or later (compute capability 8.0: an A100, not a T4 or V100, where
    bf16 is emulated, slowly); torch.compile needs Triton (:func:`compile_problem`)."""
    if device.type == "cuda":
        ampere = torch.cuda.get_device_capability(device) >= (8, 0)
        return Switches(dtype="bfloat16" if ampere else "float32", tf32=ampere, flash=True,
                        compile=compile_problem(device) is None, fused_optimizer=True)
    return Switches()


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def compile_problem(device: torch.device) -> str | None:
    """Why torch.compile cannot make code for ``device`` here, or None. On a GPU its code generator is
    Triton, which torch does not install on Windows and which needs compute capability 7.0 or later
    (not a Pascal GPU such as the P100 that Kaggle lends). On a CPU it writes C++ (a compiler is
    needed: the lab turns compile on there only when asked)."""
    if device.type != "cuda":
        return None
    if not _triton_installed():
        return "Triton, torch.compile's code generator for GPUs, is not installed (pip install triton)"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 7:
        return (f"the {torch.cuda.get_device_name(device)} has compute capability {major}.{minor}, and Triton, "
                f"torch.compile's code generator for GPUs, needs 7.0 or later")
    return None


def set_tf32(on: bool) -> None:
    """TF32 for fp32 matrix multiplies and convolutions (process-wide; no effect on a CPU).

    The legacy flags on purpose: once the newer ``fp32_precision`` setting is used, any later read of
    ``allow_tf32`` (other libraries still read it) raises a RuntimeError in torch 2.9 and later."""
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def autocast(switches: Switches, device: torch.device):
    """A context manager factory: bf16 autocast, or nothing."""
    if switches.dtype == "bfloat16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def compile_blocks(model: torch.nn.Module, switches: Switches) -> None:
    """``torch.compile`` each transformer block of ``model`` in place, when asked (as torchtitan does).

    Block by block and not the whole model, because of data parallelism: a compiled module's backward
    is one autograd node, and the gradient hooks that start a bucket's all-reduce (labkit.ddp) fire
    when it ends. Compiled whole, the backward would finish before the first all-reduce starts and
    nothing would overlap; compiled per block, the hooks fire after each block's backward, as in eager
    mode. torch's DDP, which splits a whole-model graph at its buckets itself, gets the same blocks, so
    the two DDPs are compared on the same code. The parameters and their names do not change."""
    if switches.compile:
        for block in model.blocks:
            block.compile()


def adamw_options(switches: Switches) -> dict:
    """Keyword arguments of torch.optim.AdamW for the optimizer switch: fused, or torch's default."""
    return {"fused": True} if switches.fused_optimizer else {}


# Peak dense bf16 tensor-core throughput per GPU, in TFLOP/s, from the vendors' data sheets (the
# "with sparsity" figures are twice these). Matched against torch.cuda.get_device_name(), first
# match wins.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),      # SXM (and the NVL's per-GPU figure is close)
    ("H200", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
)


def datasheet_peak_flops(device: torch.device, override_tflops: float | None = None) -> tuple[float | None, str]:
    """(peak FLOP/s of one device, where the number comes from), or (None, why there is none)."""
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    if device.type != "cuda":
        return None, "no data sheet for CPUs: pass --peak-tflops"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12, f"{name}: {tflops:g} TFLOP/s dense bf16 (data sheet)"
    return None, f"{name} is not in labkit.speed's table: pass --peak-tflops"


def measured_matmul_flops(device: torch.device, dtype: torch.dtype, *, n: int | None = None,
                          seconds: float = 0.5) -> float:
    """FLOP/s of square ``n``×``n`` matrix multiplies in ``dtype`` on ``device``, the best of a few
    timed batches of them: the rate the device really reaches on the ideal matrix multiply (default
    n = 8192 on a GPU, 512 on a CPU: large enough to be compute-bound there)."""
    n = n or (8192 if device.type == "cuda" else 512)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    a @ b
    sync()
    best, spent, repeat = 0.0, 0.0, 1
    while spent < seconds:
        start = time.perf_counter()
        for _ in range(repeat):
            a @ b
        sync()
        elapsed = time.perf_counter() - start
        spent += elapsed
        best = max(best, 2 * n ** 3 * repeat / elapsed)
        repeat = min(2 * repeat, 64)
    return best


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    """(bytes, what they are): the CUDA allocator's peak since the last reset on a GPU; on a CPU the
    process's peak resident memory (everything it ever held: Python, torch, data, the model)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    if resource is None:
        try:
            import psutil      # Jupyter's kernel installs it
            return psutil.Process().memory_info().peak_wset, "the process's peak working set"
        except (ImportError, AttributeError):
            return 0, "unknown (no peak memory reading on this system)"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss      # KiB on Linux, bytes on macOS
    return peak * (1 if sys.platform == "darwin" else 1024), "the process's peak resident memory"
