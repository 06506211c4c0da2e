"""Parameter-server training measured: update rate and time to a target loss for synchronous,
asynchronous and bounded-staleness training, with and without a straggler, and the servers' traffic
against the ring all-reduce's.

    python -m labkit.bench.ps [--workers 2 4 6] [--servers 1 2] [--modes sync async bounded:1 bounded:2]
                              [--slow 1 4] [--steps 40] [--compute-ms 90] [--repeats 3] [--quick]
                              [--json FILE]

One ``labkit.param_server.train`` (one ``labkit.launch`` of S + W CPU processes over gloo) per
configuration (mode, W workers, S servers, straggler). Every configuration trains the same model on the
same data, the same global batch of ``--batch`` samples per step, cut into W equal parts:

workload     linear regression (``labkit.data_parallel.LinearRegression``, float32) with ``--features``
             inputs (M = features + 1 parameters), on synthetic data whose feature scales fall
             geometrically from 1 to 1/``--condition`` (an ill-conditioned problem: a smooth loss curve
             that takes tens of steps, and a step size that stale gradients can push past stability);
             targets normalised to unit variance plus noise of standard deviation 0.1 (the best
             possible loss is about 0.01).
compute      emulated: each worker step sleeps ``--compute-ms`` × (its share of the global batch) =
             compute_ms / W, as a host waits for its GPU (the straggler, worker 0, k× as long). The real
             compute of this tiny model is a fraction of a millisecond (printed). On the course machine
             (2 cores) up to 8 processes run at once: real compute would mostly measure how the cores
             are shared, while a sleeping "device" computes independently of the other processes, as a
             GPU does. What is left, and measured, is the parameter server's own cost: messages and
             Python.
learning rate ``--lr`` is the synchronous step for the mean gradient of the global batch. The
             asynchronous modes apply every worker's push on its own, so they use lr / W per push:
             the same step size per sample, so that without staleness W pushes move the parameters
             as far as one synchronous step (and the same lr per push would be a W× larger step).

Measured per configuration (``run``: from each process's start of training; servers and workers start
together, after the process group is up, within a few ms):

    updates/s       server 0's parameter updates (versions) per second while every worker is still
                    running: up to the time the first worker's last push is applied (a sync update is
                    the mean of W pushes, an async update one push); samples/s likewise, in samples
    run s           time of the last update on server 0 (launching the processes excluded)
    comm+wait ms    median step time of the workers that are not the straggler, minus their emulated
                    compute: pulling, pushing, the server's queue, and waiting for others (sync, bounded)
    time to target  the first time a worker finished a step whose parameters (pulled from the servers
                    at the start of that step) had a validation loss <= ``--target``: every worker
                    evaluates the loss of a fixed validation set at the parameters it pulled, each step
                    (the loss function's value is that validation loss; its gradient the training
                    batch's), so the logged losses sample the servers' parameters over time, exactly
    samples         samples in all the gradients computed up to that time
    final loss      validation loss at the servers' final parameters
    staleness       per applied push: server version when applied − version pulled (mean and max)

Traffic: per server, the bytes it received (headers and gradient shards) and sent (versions and
parameter shards), per step, against ``server_bytes`` (every message counted) and against the ring
all-reduce's per-rank bytes 2(N − 1)/N · M · 4 sent (and as many received) for N = W.
"""

import os

# One OpenMP thread per process, set before torch is imported (up to 8 processes share the cores).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402  (imports after the environment variable on purpose)
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from torch.nn.utils import vector_to_parameters  # noqa: E402

import labkit  # noqa: E402
from labkit.bench import load_average  # noqa: E402
from labkit.data_parallel import LinearRegression  # noqa: E402
from labkit.param_server import shard_bounds, train  # noqa: E402

__all__ = ["DEFAULT_MODES", "HEADER_BYTES", "REPLY_BYTES", "parse_mode", "make_task", "server_bytes",
           "ring_bytes_per_rank", "measure", "summarise", "traffic", "format_table", "format_traffic", "main"]

DEFAULT_MODES = ("sync", "async", "bounded:1", "bounded:2")
HEADER_BYTES = 4 * 8       # a worker's header to a server: (kind, worker, version, step) in int64
REPLY_BYTES = 8            # a server's reply before the parameters: the version, one float64
ITEMSIZE = 4               # float32 parameters and gradients


def parse_mode(label: str) -> tuple[str, int]:
    """``"sync"``, ``"async"`` or ``"bounded:τ"`` → (param_server mode, staleness bound τ)."""
    if label in ("sync", "async"):
        return label, 0
    name, _, tau = label.partition(":")
    if name == "bounded" and tau.isdigit():
        return "bounded", int(tau)
    raise ValueError(f"unknown mode {label!r}; choose sync, async or bounded:τ (τ a non-negative integer, "
                     f"e.g. bounded:1)")


# ---- the workload ----------------------------------------------------------------------------------

def make_task(features: int = 255, samples: int = 4096, validation: int = 512, condition: float = 10.0,
              noise: float = 0.1, seed: int = 0) -> dict:
    """Synthetic linear regression: x_i = z_i · s_i with z ~ N(0, 1) and scales s falling geometrically
    from 1 to 1/condition; y = x·w* normalised to unit variance, plus N(0, noise²). A training set and
    a separate validation set, float32."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -math.log10(condition), features, dtype=torch.float64)
    X = torch.randn(samples + validation, features, generator=g, dtype=torch.float64) * scales
    y = X @ torch.randn(features, generator=g, dtype=torch.float64)
    y = y / y.std() + noise * torch.randn(len(y), generator=g, dtype=torch.float64)
    X, y = X.float(), y.float()
    return dict(X=X[:samples], Y=y[:samples], XV=X[samples:], YV=y[samples:], features=features)


class _Model:
    """model_fn: the same zero-initialised LinearRegression on every rank."""

    def __init__(self, features: int):
        self.features = features

    def __call__(self):
        return LinearRegression(self.features)


class _Batches:
    """batch_fn(worker, step): worker's part of step's global batch (the same samples in every mode)."""

    def __init__(self, task: dict, batch: int, workers: int, seed: int):
        self.X, self.Y, self.batch, self.workers, self.seed = task["X"], task["Y"], batch, workers, seed

    def __call__(self, worker: int, step: int):
        g = torch.Generator().manual_seed(self.seed * 100_003 + step)
        idx = torch.randperm(len(self.X), generator=g)[:self.batch]
        return self.X[idx].chunk(self.workers)[worker], self.Y[idx].chunk(self.workers)[worker]


class _ValidationLoss:
    """loss_fn: the training batch's MSE for the gradient, with the value of the validation set's MSE at
    the same (pulled) parameters, so that what a worker logs is the validation loss."""

    def __init__(self, task: dict):
        self.XV, self.YV = task["XV"], task["YV"]

    def __call__(self, model, xb, yb):
        train_loss = model.loss(xb, yb)
        with torch.no_grad():
            validation = model.loss(self.XV, self.YV)
        return train_loss + (validation - train_loss).detach()


def _validation_loss(task: dict, params: torch.Tensor) -> float:
    model = _Model(task["features"])()
    vector_to_parameters(params, model.parameters())
    with torch.no_grad():
        return model.loss(task["XV"], task["YV"]).item()


def _real_compute_ms(task: dict, batch: int, workers: int) -> float:
    """Median time of one worker step's real compute (forward, backward, validation loss) in this process."""
    model, loss_fn = _Model(task["features"])(), _ValidationLoss(task)
    xb, yb = _Batches(task, batch, workers, 0)(0, 0)
    times = []
    for _ in range(30):
        start = time.perf_counter()
        model.zero_grad()
        loss_fn(model, xb, yb).backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


# ---- traffic formulas ------------------------------------------------------------------------------

def server_bytes(workers: int, servers: int, numel: int, steps: int, itemsize: int = ITEMSIZE) -> list:
    """(bytes in, bytes out) of each server for a whole run in which every worker finishes ``steps``
    steps: per worker and step a pull header, a push header and the gradient shard in, the version and
    the parameter shard out; a "done" header per worker at the end."""
    out = []
    for a, b in shard_bounds(numel, servers):
        shard = (b - a) * itemsize
        out.append((workers * (steps * (2 * HEADER_BYTES + shard) + HEADER_BYTES),
                    workers * steps * (REPLY_BYTES + shard)))
    return out


def ring_bytes_per_rank(world_size: int, numel: int, itemsize: int = ITEMSIZE) -> float:
    """Bytes each rank sends (and as many it receives) in one ring all-reduce: 2(N − 1)/N · M · itemsize."""
    return 2 * (world_size - 1) / world_size * numel * itemsize


# ---- measurement -----------------------------------------------------------------------------------

def _run_one(task: dict, label: str, workers: int, servers: int, slow: float, *, steps: int, batch: int,
             compute_ms: float, lr: float, timeout: float, retries: int, seed: int) -> dict:
    mode, tau = parse_mode(label)
    config = dict(mode=label, workers=workers, servers=servers, slow=slow)
    errors = []
    for _ in range(1 + retries):
        start = time.perf_counter()
        try:
            run = train(_Model(task["features"]), _Batches(task, batch, workers, seed), _ValidationLoss(task),
                        workers=workers, servers=servers, mode=mode, staleness=tau, steps=steps,
                        lr=lr if mode == "sync" else lr / workers, compute_ms=compute_ms / workers,
                        slow={0: slow} if slow != 1 else None, timeout=timeout)
        except labkit.WorkerError as exc:   # a process that failed or timed out: kept, and launched again
            errors.append(f"{str(exc).splitlines()[0]} [after {time.perf_counter() - start:.0f} s]")
            continue
        wall = time.perf_counter() - start
        return dict(config, wall_s=wall, errors=errors, stopped=run.stopped,
                    final_loss=_validation_loss(task, run.params),
                    server_stats=[dict(version=s.version, pushes=len(s.updates), bytes_in=s.bytes_in,
                                  bytes_out=s.bytes_out, lost=list(s.lost)) for s in run.servers],
                    updates=[list(u) for u in run.servers[0].updates],
                    losses=[[list(entry) for entry in w.losses] for w in run.workers],
                    steps_done=[w.steps_done for w in run.workers])
    return dict(config, errors=errors)


def _check(workers, servers, modes, slow, steps, batch, compute_ms, lr, target, features, timeout, retries):
    for what, values in (("workers", workers), ("servers", servers)):
        if not values or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values):
            raise ValueError(f"{what} must be positive integers, not {list(values)}")
    if max(servers) > features + 1:
        raise ValueError(f"cannot cut {features + 1} parameters into {max(servers)} server shards")
    if any(batch % w for w in workers):
        raise ValueError(f"the global batch {batch} must split into equal parts: it is not a multiple of "
                         f"every W in {list(workers)}")
    if not modes:
        raise ValueError("no modes given")
    for label in modes:
        parse_mode(label)
    if not slow or any(not k >= 1 for k in slow):
        raise ValueError(f"straggler factors must be >= 1 (1: no straggler), not {list(slow)}")
    if steps < 1 or batch < 1 or features < 1 or retries < 0:
        raise ValueError(f"steps, batch and features must be at least 1, retries at least 0 (steps={steps}, "
                         f"batch={batch}, features={features}, retries={retries})")
    if compute_ms < 0 or not lr > 0 or not target > 0 or not timeout > 0:
        raise ValueError(f"compute_ms must be >= 0, lr, target and timeout positive (compute_ms={compute_ms}, "
                         f"lr={lr}, target={target}, timeout={timeout})")


def measure(workers=(2, 4, 6), servers=(1, 2), modes=DEFAULT_MODES, slow=(1.0, 4.0), *, steps: int = 40,
            batch: int = 96, compute_ms: float = 90.0, lr: float = 0.5, target: float = 0.05,
            features: int = 255, condition: float = 10.0, samples: int = 4096, validation: int = 512,
            seed: int = 0, timeout: float = 5.0, retries: int = 1, repeats: int = 1, progress=None) -> dict:
    """Train every configuration (W in ``workers``, S in ``servers``, straggler factor of worker 0 in
    ``slow`` (1: none), mode in ``modes``), one launch of S + W processes each. ``compute_ms``: emulated
    compute of the whole global batch (a worker's step: compute_ms / W, the straggler's k× that);
    ``lr``: the synchronous step (asynchronous modes: lr / W per push); ``timeout``: the servers'
    patience (it must exceed the straggler's step); ``retries``: launches again after a failed one (the
    failure is kept in ``errors``); ``repeats``: every configuration this many times, in rounds (round r
    runs every configuration once), so that a passing disturbance of the machine hits one repeat of several
    configurations rather than every repeat of one. ``progress``: called with a line after each launch."""
    workers, servers, modes, slow = tuple(workers), tuple(servers), tuple(modes), tuple(float(k) for k in slow)
    _check(workers, servers, modes, slow, steps, batch, compute_ms, lr, target, features, timeout, retries)
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, not {repeats}")
    task = make_task(features, samples, validation, condition, seed=seed)
    configs = [(w, s, k, m) for _ in range(repeats) for w in workers for s in servers for k in slow for m in modes]
    runs = []
    for i, (w, s, k, m) in enumerate(configs):
        run = _run_one(task, m, w, s, k, steps=steps, batch=batch, compute_ms=compute_ms, lr=lr,
                       timeout=timeout, retries=retries, seed=seed)
        run["repeat"] = i // (len(configs) // repeats)
        runs.append(run)
        if progress:
            done = f"{run['wall_s']:.1f} s" if "wall_s" in run else "FAILED"
            progress(f"[{i + 1}/{len(configs)}] {m} W={w} S={s} slow={k:g}: {done}"
                     + (f" ({len(run['errors'])} failed launch(es))" if run["errors"] else ""))
    return dict(workers=list(workers), servers=list(servers), modes=list(modes), slow=list(slow), steps=steps,
                batch=batch, compute_ms=compute_ms, lr=lr, target=target, features=features, numel=features + 1,
                repeats=repeats,
                condition=condition, samples=samples, validation=validation, seed=seed, timeout=timeout,
                initial_loss=_validation_loss(task, torch.zeros(features + 1)),
                real_compute_ms={w: _real_compute_ms(task, batch, w) for w in workers}, runs=runs)


# ---- summary and tables ----------------------------------------------------------------------------

def summarise(result: dict) -> list:
    """One row per launch: rates, times, losses, staleness (None where the run failed)."""
    rows = []
    for run in result["runs"]:
        w, k = run["workers"], run["slow"]
        row = dict(mode=run["mode"], workers=w, servers=run["servers"], slow=k, processes=w + run["servers"],
                   repeat=run.get("repeat", 0), failed_launches=len(run["errors"]))
        if "updates" not in run:
            rows.append(dict(row, failed=True))
            continue
        sync = run["mode"] == "sync"
        updates = run["updates"]
        last_push = [max(t for t, worker, *_ in updates if worker == i) for i in range(w)
                     if any(worker == i for _, worker, *_ in updates)]
        all_running = min(last_push)
        pushes_then = sum(1 for t, *_ in updates if t <= all_running)
        local = result["batch"] / w
        compute = result["compute_ms"] / w
        fast = [i for i in range(w) if not (k != 1 and i == 0)]
        intervals = [b[0] - a[0] for i in fast for a, b in zip(run["losses"][i], run["losses"][i][1:])]
        step_ms = statistics.median(intervals) * 1e3 if intervals else None
        logged = sorted((t, loss) for losses in run["losses"] for t, _, loss in losses)
        hit = next((t for t, loss in logged if loss <= result["target"]), None)
        stale = [u[3] for u in updates]
        row.update(
            failed=False, steps_done=min(run["steps_done"]), versions=run["server_stats"][0]["version"],
            pushes=len(updates), run_s=updates[-1][0] if updates else 0.0,
            updates_per_s=(pushes_then / w if sync else pushes_then) / all_running,
            samples_per_s=pushes_then * local / all_running,
            step_ms=step_ms, overhead_ms=None if step_ms is None else step_ms - compute,
            time_to_target=hit,
            samples_to_target=None if hit is None else sum(1 for t, _ in logged if t <= hit) * local,
            final_loss=run["final_loss"],
            staleness_mean=statistics.mean(stale) if stale else 0.0, staleness_max=max(stale, default=0),
            stopped=run["stopped"])
        rows.append(row)
    return rows


_MEDIANS = ("updates_per_s", "samples_per_s", "run_s", "step_ms", "overhead_ms", "final_loss", "staleness_mean")


def combine(rows: list) -> list:
    """One row per configuration from :func:`summarise`'s rows: the median over its repeats of every rate,
    time and loss (time to target: over the repeats that reached it, ``reached`` says how many), the
    largest staleness, the range of updates/s; ``repeats``: launches that finished."""
    groups = {}
    for row in rows:
        groups.setdefault((row["mode"], row["workers"], row["servers"], row["slow"]), []).append(row)
    out = []
    for group in groups.values():
        done = [r for r in group if not r["failed"]]
        row = {k: group[0][k] for k in ("mode", "workers", "servers", "slow", "processes")}
        row.update(repeats=len(done), failed_launches=sum(r["failed_launches"] for r in group), failed=not done)
        if done:
            def median(key, rs=done):
                values = [r[key] for r in rs if r[key] is not None]
                return statistics.median(values) if values else None
            hits = [r for r in done if r["time_to_target"] is not None]
            row.update({key: median(key) for key in _MEDIANS})
            row.update(steps_done=min(r["steps_done"] for r in done), reached=len(hits),
                       time_to_target=median("time_to_target", hits),
                       samples_to_target=median("samples_to_target", hits),
                       staleness_max=max(r["staleness_max"] for r in done),
                       updates_per_s_range=(min(r["updates_per_s"] for r in done),
                                            max(r["updates_per_s"] for r in done)),
                       stopped=next((r["stopped"] for r in done if r["stopped"]), ""))
        out.append(row)
    return out


def traffic(result: dict) -> list:
    """One row per (W, S): server 0's measured bytes per step (the same in every mode that finished all
    its steps) against :func:`server_bytes` and the ring's per-rank bytes for N = W."""
    rows, numel, steps = [], result["numel"], result["steps"]
    for w in result["workers"]:
        for s in result["servers"]:
            done = [r for r in result["runs"] if r["workers"] == w and r["servers"] == s and "server_stats" in r
                    and min(r["steps_done"]) == steps and not r["stopped"]]
            if not done:
                continue
            expected = server_bytes(w, s, numel, steps)
            measured = [(srv["bytes_in"], srv["bytes_out"]) for srv in done[0]["server_stats"]]
            exact = all([(srv["bytes_in"], srv["bytes_out"]) for srv in r["server_stats"]] == expected for r in done)
            ring = ring_bytes_per_rank(w, numel)
            busiest = max(i + o for i, o in measured) / steps
            rows.append(dict(
                workers=w, servers=s, numel=numel, runs=len(done), exact=exact,
                server_in=measured[0][0] / steps, server_out=measured[0][1] / steps,
                formula_in=expected[0][0] / steps, formula_out=expected[0][1] / steps,
                payload=2 * w * math.ceil(numel / s) * ITEMSIZE,
                ring_sent=ring, ring_in_out=2 * ring, busiest_over_ring=busiest / (2 * ring),
                worker_in_out=2 * numel * ITEMSIZE + s * (2 * HEADER_BYTES + REPLY_BYTES)))
    return rows


def _fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def format_table(result: dict) -> str:
    """One line per configuration: medians over its repeats (:func:`combine`)."""
    lines = [f"{'mode':<10} {'W':>2} {'S':>2} {'slow':>4} {'procs':>5} {'n':>2} {'updates/s':>9} {'(range)':>13} "
             f"{'samples/s':>9} {'run s':>6} {'comm+wait ms':>12} {'to target s':>11} {'samples':>8} "
             f"{'final loss':>10} {'stale mean':>10} {'max':>4}"]
    for r in combine(summarise(result)):
        head = f"{r['mode']:<10} {r['workers']:>2} {r['servers']:>2} {r['slow']:>4g} {r['processes']:>5}"
        if r["failed"]:
            lines.append(f"{head} failed: {r['failed_launches']} launch(es) did not finish (see errors in --json)")
            continue
        low, high = r["updates_per_s_range"]
        target = _fmt(r["time_to_target"], ".2f", "not reached")
        if r["time_to_target"] is not None and r["reached"] < r["repeats"]:
            target = f"{target} ({r['reached']}/{r['repeats']})"
        note = f"  ({r['failed_launches']} failed launch(es) retried)" if r["failed_launches"] else ""
        note += "  STOPPED EARLY" if r["stopped"] else ""
        note += f"  ({r['steps_done']} steps)" if r["steps_done"] != result["steps"] else ""
        lines.append(f"{head} {r['repeats']:>2} {r['updates_per_s']:>9.1f} {f'{low:.1f}-{high:.1f}':>13} "
                     f"{r['samples_per_s']:>9.0f} {r['run_s']:>6.2f} {_fmt(r['overhead_ms'], '>12.1f'):>12} "
                     f"{target:>11} {_fmt(r['samples_to_target'], '>8.0f'):>8} {r['final_loss']:>10.4f} "
                     f"{r['staleness_mean']:>10.1f} {r['staleness_max']:>4}{note}")
    return "\n".join(lines)


def format_traffic(result: dict) -> str:
    """Server 0's bytes per step, measured against the formula and against the ring all-reduce."""
    lines = [f"{'W':>2} {'S':>2} {'M':>5} {'server in B/step':>16} {'(formula)':>10} {'server out B/step':>17} "
             f"{'(formula)':>10} {'exact':>5} {'payload 2WM/S*4':>15} {'ring sent/rank':>14} "
             f"{'busiest server/ring rank':>24}"]
    for r in traffic(result):
        lines.append(f"{r['workers']:>2} {r['servers']:>2} {r['numel']:>5} {r['server_in']:>16.1f} "
                     f"{r['formula_in']:>10.1f} {r['server_out']:>17.1f} {r['formula_out']:>10.1f} "
                     f"{'yes' if r['exact'] else 'NO':>5} {r['payload']:>15} {r['ring_sent']:>14.1f} "
                     f"{r['busiest_over_ring']:>23.2f}x")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", help="W (default 2 4 6; --quick: 2 4)")
    parser.add_argument("--servers", type=int, nargs="+", default=[1, 2], help="S (default 1 2)")
    parser.add_argument("--modes", nargs="+", help="sync, async, bounded:τ (default sync async bounded:1 bounded:2; "
                        "--quick: sync async bounded:1)")
    parser.add_argument("--slow", type=float, nargs="+", default=[1.0, 4.0],
                        help="straggler factors of worker 0, 1 = none (default 1 4)")
    parser.add_argument("--steps", type=int, help="steps per worker (default 40; --quick: 25)")
    parser.add_argument("--batch", type=int, default=96, help="global batch per step, split over W (default 96)")
    parser.add_argument("--compute-ms", type=float, help="emulated compute of the global batch; a worker's "
                        "step sleeps compute_ms / W (default 90; --quick: 60)")
    parser.add_argument("--lr", type=float, default=0.5, help="sync step size; async modes use lr / W per push "
                        "(default 0.5)")
    parser.add_argument("--target", type=float, help="target validation loss (default 0.05; --quick: 0.1)")
    parser.add_argument("--features", type=int, default=255, help="linear regression inputs, M = features + 1")
    parser.add_argument("--condition", type=float, default=10.0, help="largest / smallest feature scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=5.0, help="servers' patience in seconds (default 5)")
    parser.add_argument("--repeats", type=int, help="launches of every configuration, in rounds; the table "
                        "shows medians (default 3; --quick: 1)")
    parser.add_argument("--retries", type=int, default=1, help="launches again after a failed launch (default 1)")
    parser.add_argument("--quick", action="store_true", help="a short run (about a minute): W = 2 4, three modes, "
                        "25 steps; options given explicitly win")
    parser.add_argument("--json", metavar="FILE", help="write the raw measurements and the summary to FILE")
    args = parser.parse_args(argv)
    defaults = dict(workers=[2, 4], modes=["sync", "async", "bounded:1"], steps=25, compute_ms=60.0, target=0.1,
             repeats=1) \
        if args.quick else dict(workers=[2, 4, 6], modes=list(DEFAULT_MODES), steps=40, compute_ms=90.0, target=0.05,
                  repeats=3)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    load_before, start = load_average(), time.perf_counter()
    result = measure(args.workers, args.servers, args.modes, args.slow, steps=args.steps, batch=args.batch,
                     compute_ms=args.compute_ms, lr=args.lr, target=args.target, features=args.features,
                     condition=args.condition, seed=args.seed, timeout=args.timeout, retries=args.retries,
                     repeats=args.repeats,
                     progress=lambda line: print(line, file=sys.stderr, flush=True))
    cores = os.cpu_count()
    most = max(args.workers) + max(args.servers)
    rows = summarise(result)
    failed = sum(r["failed_launches"] for r in rows)
    real = ", ".join(f"W={w}: {ms:.2f} ms" for w, ms in result["real_compute_ms"].items())
    report = "\n".join([
        f"labkit.bench.ps: parameter server (labkit.param_server.train), S servers + W workers = S + W CPU "
        f"processes over gloo, {args.steps} steps per worker, global batch {args.batch} split over W",
        f"  model: linear regression, M = {result['numel']} float32 parameters; synthetic data, feature scales "
        f"1 .. 1/{args.condition:g}, unit-variance targets + noise 0.1 (best loss ~0.01); "
        f"validation loss at the start {result['initial_loss']:.3f}, target {args.target:g}",
        f"  compute: emulated, {args.compute_ms:g} ms per global batch: a worker step sleeps {args.compute_ms:g}/W ms "
        f"(straggler: worker 0, slow x that); real compute per worker step (forward, backward, validation "
        f"loss): {real}",
        f"  lr: sync {args.lr:g} on the mean gradient of the global batch; async and bounded {args.lr:g}/W per push "
        f"(the same step per sample)",
        f"torch {torch.__version__}, Python {platform.python_version()}, os.cpu_count() = {cores}, up to {most} "
        f"processes ({'more processes than cores: they share them' if most > cores else 'a core per process'}), "
        f"1 torch thread each; load average {load_before} before, {load_average()} after; whole run "
        f"{time.perf_counter() - start:.0f} s ({len(rows)} launches"
        + (f", {failed} more that failed and were retried" if failed else "") + ")",
        f"n: launches of the configuration ({args.repeats} requested, in rounds), every column the median over "
        "them (updates/s also min-max; to target: over the launches that reached it, (k/n) if not all did)",
        "updates/s: server 0's parameter updates per second while every worker still runs (sync: one per "
        "step, the mean of W pushes; async/bounded: one per push); samples/s: samples in those updates per "
        "second; run s: time of the last update; comm+wait ms: median step time of the non-straggling "
        "workers minus their emulated compute",
        "to target s: first time a worker finished a step on pulled parameters whose validation loss was <= "
        "the target (not reached: never within the run); samples: samples in the gradients computed by then; "
        "final loss: validation loss at the servers' final parameters; stale: server version at apply - version "
        "pulled, over all pushes",
        "",
        format_table(result),
        "",
        "traffic of server 0 per step (every run of a (W, S) counts the same bytes), against the formula "
        "W*(2*32 + shard*4) in and W*(8 + shard*4) out (+ 32 B per worker once, at the end), and against one "
        "ring all-reduce of M float32 over N = W ranks: each rank sends 2(N-1)/N*M*4 B and receives as many; "
        "busiest server/ring rank = the busiest server's in+out over a ring rank's in+out",
        format_traffic(result),
    ])
    print(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), cpu_count=cores, result=result, summary=rows,
                           traffic=traffic(result)), f, indent=1)


if __name__ == "__main__":
    main()
