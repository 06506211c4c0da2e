"""Forking the caller against labkit's fork server, on a machine with an NVIDIA GPU.

    python -m labkit.bench.launch_after_gpu          # needs a CUDA GPU; prints one table

What a lesson does before it launches (nothing; a CUDA query; a backward pass on the GPU), then a
launch of 4 CPU ranks that each run a backward pass and an Adam step, and of 1 CUDA rank, with
``start_method="fork"`` (the caller forked, CUDA queries routed through NVML) and with the default
fork server. Each row is measured in a fresh Python process, so one row's state cannot leak into the next.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

STATES = ("nothing", "cuda query", "gpu backward")


def _cpu_step() -> float:
    import torch
    w = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.Adam([w], lr=0.1)
    (w * torch.arange(4.0)).sum().backward()
    opt.step()
    return float(w.detach().sum())


def _cuda_step() -> float:
    import torch
    x = torch.ones(4, device="cuda", requires_grad=True)
    (x * x).sum().backward()
    return float(x.grad.detach().sum())


def one_row(state: str, start_method: str) -> dict:
    """In this process: put the caller in ``state``, then launch; returns what happened."""
    import torch

    import labkit
    if state == "cuda query":
        torch.cuda.init()                     # what any CUDA call does (a tensor on the GPU, a capability query)
    elif state == "gpu backward":
        x = torch.randn(8, device="cuda", requires_grad=True)
        (x * x).sum().backward()
    row = {"state": state, "start_method": start_method}
    for name, fn, kwargs in (("4 CPU ranks", _cpu_step, dict(world_size=4)),
                             ("1 CUDA rank", _cuda_step, dict(world_size=1, device="cuda"))):
        times = []
        try:
            for _ in range(3):
                start = time.perf_counter()
                labkit.launch(fn, start_method=start_method, timeout=60, **kwargs)
                times.append(time.perf_counter() - start)
            row[name] = f"ok: {times[0]:.2f} s, then {min(times[1:]):.2f} s"
        except Exception as exc:  # noqa: BLE001 - the failure is the measurement
            text = getattr(exc, "remote_traceback", "") or str(exc)
            last = [line for line in text.strip().splitlines() if line.strip()][-1]
            row[name] = f"FAILS: {last[:110]}"
    return row


def main() -> None:
    rows = []
    for state in STATES:
        for method in ("fork", "forkserver"):
            out = subprocess.run([sys.executable, "-c", f"import json, labkit.bench.launch_after_gpu as b; "
                                  f"print(json.dumps(b.one_row({state!r}, {method!r})))"],
                                 capture_output=True, text=True, timeout=300)
            line = (out.stdout.strip().splitlines() or ["{}"])[-1]
            rows.append(json.loads(line) if line.startswith("{") else {"state": state, "start_method": method,
                                                                       "4 CPU ranks": out.stderr[-200:]})
    print("caller did      start method  4 CPU ranks (backward + Adam step)                    1 CUDA rank")
    for r in rows:
        print(f"{r['state']:<15} {r['start_method']:<13} {r.get('4 CPU ranks', ''):<53} {r.get('1 CUDA rank', '')}")


if __name__ == "__main__":
    main()
