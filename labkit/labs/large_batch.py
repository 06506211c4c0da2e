"""Lab 4: the batch-size sweep of lesson 4, as a command line over :mod:`labkit.large_batch`.

    python -m labkit.labs.large_batch --output docs/results/large_batch_sweep.json    # the committed sweep
    python -m labkit.labs.large_batch --world-size 2 --scales 1 4 16 --methods sgd lamb --epochs 0.5
    torchrun --standalone --nproc-per-node 2 -m labkit.labs.large_batch --world-size 2

The experiment and its protocol are described in :mod:`labkit.large_batch`, the sweep's options in
:mod:`labkit.large_batch_sweep` (``--help`` lists them). This file only parses the command line, runs :func:`labkit.large_batch_sweep.train` on
every rank (under torchrun or accelerate, or on ``--world-size`` processes of its own), and writes the
outputs (rank 0): a progress bar, ``--output`` (JSON: the command, the options, the tuning grid, every
run's losses, curves, steps and gains) and a figure next to it (same name, ``.png``), then a summary table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from pathlib import Path

from labkit.labs.entry import run_as_script, run_lab, under_launcher
from labkit.large_batch import DECAYS, DEFAULT_LRS, METHODS, SCALING_RULES
from labkit.large_batch_sweep import DEFAULTS, check_options, summary_table, train
from labkit.models.gpt import PRESETS

__all__ = ["parse_args", "main"]


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: :data:`labkit.large_batch_sweep.DEFAULTS` as options, plus --output and --no-figure."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="the experiment: labkit/large_batch.py",
                                allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--world-size", type=int,
                   help="processes expected (checked against the launcher's world); without a launcher, "
                        "how many workers labkit.launch starts (None: 1)")
    p.add_argument("--methods", nargs="+", choices=METHODS, help="methods to compare")
    p.add_argument("--scales", nargs="+", type=int,
                   help="batch-size multiples k (must include 1: the base learning rates are tuned there)")
    p.add_argument("--base-batch", type=int, help="B: blocks per step at k = 1 (all ranks together)")
    p.add_argument("--epochs", type=float, help="samples budget, in passes over the training blocks")
    p.add_argument("--lrs", nargs="+", metavar="METHOD=LR[,LR...]",
                   help="base learning rates to try at k = 1 (one value: no tuning); defaults: "
                        + "; ".join(f"{m}={','.join(map(str, v))}" for m, v in DEFAULT_LRS.items())
                        + "; adascale: SGD's tuned rate")
    p.add_argument("--adam-scaling", choices=SCALING_RULES, help="lr multiplier of adam at k")
    p.add_argument("--lamb-scaling", choices=SCALING_RULES, help="lr multiplier of lamb at k")
    p.add_argument("--sgd-scaling", choices=SCALING_RULES, help="lr multiplier of sgd at k")
    p.add_argument("--warmup", type=float, help="fraction of each run's steps spent warming up")
    p.add_argument("--decay", choices=DECAYS, help="learning rate after warm-up")
    p.add_argument("--momentum", type=float, help="momentum of sgd and adascale")
    p.add_argument("--weight-decay", type=float,
                   help="adam and lamb, on the ≥2-D weights (biases and LayerNorms: none, and no trust ratio)")
    p.add_argument("--adascale-gradients", type=int,
                   help="independent gradients per AdaScale step (workers × micro-batches), at most k "
                        "(at least 2)")
    p.add_argument("--adascale-max-epochs", type=float,
                   help="stop an AdaScale run that has read this many epochs (default: 8 × --epochs)")
    p.add_argument("--target-loss", type=float, help="validation loss for 'steps to target'")
    p.add_argument("--eval-points", type=int, help="validation evaluations per run (besides step 0)")
    p.add_argument("--eval-blocks", type=int, help="validation blocks of those evaluations")
    p.add_argument("--preset", choices=list(PRESETS), help="GPT size")
    p.add_argument("--seed", type=int, help="initial weights (the same for every run) and data order")
    p.add_argument("--output", default=None, help="results JSON, with the figure next to it "
                                                  "(default runs/large_batch-<time>.json)")
    p.add_argument("--no-figure", action="store_true", help="do not draw the figure")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, help="progress bar")
    p.add_argument("--timeout", type=float, help="seconds a rank may wait in a collective")
    p.set_defaults(**DEFAULTS)                      # the defaults live with the experiment
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    args.argv = argv
    check_options(args)
    return args


def _command(args) -> str:
    prefix = "torchrun --standalone --nproc-per-node N -m" if under_launcher() else "python -m"
    return f"{prefix} labkit.labs.large_batch " + " ".join(shlex.quote(a) for a in args.argv)


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------

def write_figure(results: dict, path: Path) -> None:
    """The sweep's figure (:func:`labkit.large_batch_figures.batch_sweep_figure`) as a PNG, without pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg   # no pyplot: no global backend change
    from matplotlib.figure import Figure

    from labkit.large_batch_figures import batch_sweep_figure

    fig = Figure(figsize=(15, 5.2))
    FigureCanvasAgg(fig)
    o = results["options"]
    batch_sweep_figure(results, figure=fig, title=(
        f"GPT {o['preset']} ({results['model']['params']:,} parameters), {o['epochs']:g} epoch"
        f"{'' if o['epochs'] == 1 else 's'} per run, base batch B = {o['base_batch']} blocks of "
        f"{results['block_size']} characters, {results['world_size']} "
        f"process{'' if results['world_size'] == 1 else 'es'}"))
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> dict:
    """Parse, run the sweep on every rank, and (rank 0) write and print the results."""
    args = parse_args(argv)
    if args.output is None:
        args.output = str(Path("runs") / f"large_batch-{datetime.datetime.now():%Y%m%d-%H%M%S}.json")
    args.command = _command(args)          # here: in a worker that labkit.launch started, WORLD_SIZE is set
    rank, results = run_lab(train, args, device="cpu")   # a tiny model: CPU processes, also on GPU machines
    if rank == 0:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        results["output"] = str(out)
        if not args.no_figure:
            results["figure"] = str(out.with_suffix(".png"))
        out.write_text(json.dumps(results, indent=1))
        if not args.no_figure:
            write_figure(results, out.with_suffix(".png"))
        print("tuned at k = 1: " + ", ".join(
            f"{m} η = {lr:g}" for m, lr in results["best_lr"].items()), flush=True)
        print(summary_table(results), flush=True)
        print(f"{len(results['runs'])} points, {results['seconds']:.0f} s on {results['world_size']} process(es) "
              f"-> {out}", flush=True)
    return results


if __name__ == "__main__":
    run_as_script(main)
