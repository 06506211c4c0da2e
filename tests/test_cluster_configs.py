"""The cluster files lesson 10 shows (Kubernetes, Ray) give the GPT lab options it accepts and a world that adds up;
and the data loader's model."""

import ast
import shlex
from pathlib import Path

import pytest
import yaml

from labkit.data_loading import measure, predicted_seconds
from labkit.labs import train_gpt

ROOT = Path(__file__).resolve().parents[1]


def _lab_options(command: str) -> list[str]:
    words = shlex.split(command.replace('"$OUT"', "/shared/out").replace("$RESUME", ""))
    return words[words.index("labkit.labs.train_gpt") + 1:]


def test_the_pytorchjob_starts_a_world_of_the_size_the_lab_expects():
    job = yaml.safe_load((ROOT / "configs/kubernetes/pytorchjob.yaml").read_text())
    assert job["kind"] == "PyTorchJob"
    spec = job["spec"]
    worker = spec["pytorchReplicaSpecs"]["Worker"]
    script = worker["template"]["spec"]["containers"][0]["args"][0]
    command = " ".join(line.strip().rstrip("\\") for line in script.splitlines() if "torchrun" in line or "--" in line)
    args = train_gpt.parse_args(_lab_options(command))
    assert args.world_size == worker["replicas"] * int(spec["nprocPerNode"])
    assert spec["elasticPolicy"]["minReplicas"] <= worker["replicas"] <= spec["elasticPolicy"]["maxReplicas"]
    assert args.checkpoint_every > 0 and "--resume $OUT" in script      # a restarted pod continues


def test_the_ray_script_gives_the_lab_options_it_accepts():
    tree = ast.parse((ROOT / "configs/ray/train_gpt_ray.py").read_text())
    workers = next(n.value.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "WORKERS")
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "main")
    stand_in = {ast.Call: str(workers), ast.Subscript: "/shared/out"}      # str(WORKERS), config["out_dir"]
    options = [e.value if isinstance(e, ast.Constant) else stand_in[type(e)] for e in call.args[0].elts]
    args = train_gpt.parse_args(options)
    assert args.world_size == workers and args.checkpoint_every > 0


def test_the_loader_model():
    assert predicted_seconds(10, load_s=0.04, step_s=0.01, workers=0) == pytest.approx(0.5)
    assert predicted_seconds(10, load_s=0.04, step_s=0.01, workers=2) == pytest.approx(0.2)
    assert predicted_seconds(10, load_s=0.04, step_s=0.01, workers=8) == pytest.approx(0.1)   # the step bounds it
    timing = measure(2, batches=5, batch_size=2, read_s=0.001, step_s=0.01)
    assert timing.workers == 2 and timing.measured >= 5 * 0.01                 # every step's wait is in it
