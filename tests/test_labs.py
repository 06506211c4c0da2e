"""The lab script runs the same worker code under labkit.launch, torchrun and accelerate launch,
and refuses a world that is not the one asked for."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from labkit.labs import dp_sgd
from labkit.launcher import init_from_env

ROOT = Path(__file__).resolve().parents[1]


def test_lab_under_labkit_launch_server_equals_allreduce():
    common = ["--world-size", "2", "--epochs", "3", "--samples", "256", "--features", "4"]
    a = dp_sgd.main(common + ["--sync", "allreduce"])
    s = dp_sgd.main(common + ["--sync", "server"])
    assert a["world_size"] == 2 and a["replicas_identical"] and s["replicas_identical"]
    assert a["loss"][-1] < a["loss"][0] / 2
    assert a["loss"] == pytest.approx(s["loss"], rel=1e-5)


def _run(cmd, **env):
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **env)
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300)


LAB = ["-m", "labkit.labs.dp_sgd", "--epochs", "2", "--samples", "128", "--features", "4"]


def test_lab_under_torchrun():
    out = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                *LAB, "--world-size", "2"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "world size 2 (gloo on cpu)" in out.stdout and "replicas identical: True" in out.stdout


def test_lab_under_accelerate_launch_with_the_shipped_cpu_config():
    out = _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                "configs/accelerate/cpu.yaml", "--num_processes", "2", *LAB, "--world-size", "2"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "world size 2 (gloo on cpu)" in out.stdout


def test_accelerate_cpu_flag_single_process_is_refused():
    """`accelerate launch --cpu --num_processes 2` starts ONE process: labkit must say so."""
    out = _run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
                *LAB, "--world-size", "2"])
    assert out.returncode != 0
    assert "ONE process without a distributed world" in out.stderr


def test_world_size_mismatch_is_refused(monkeypatch):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(port)).items():
        monkeypatch.setenv(k, v)
    with pytest.raises(RuntimeError, match="asked for a world of 4 processes but this process sees world size 1"):
        init_from_env(expected_world_size=4)
    assert not dist.is_initialized()


ACCEL_SCRIPT = """
import os, sys
from accelerate import Accelerator
from labkit.launcher import check_accelerator
acc = Accelerator(cpu=len(sys.argv) > 1)
check_accelerator(acc)
# one write per rank: with PYTHONUNBUFFERED, print() writes each argument separately and the two ranks'
# lines could interleave ("okok 0 2")
os.write(1, f"ok {acc.process_index} {acc.num_processes}\\n".encode())
"""


@pytest.mark.parametrize("cpu_flag", [False, True])
def test_check_accelerator_catches_the_silent_world_of_one(tmp_path, cpu_flag):
    script = tmp_path / "acc.py"
    script.write_text(ACCEL_SCRIPT)
    # the trap is a machine without GPUs: on one with a GPU, hide it (there Accelerator() would use it)
    out = _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                "configs/accelerate/cpu.yaml", "--num_processes", "2", str(script)] + (["cpu"] if cpu_flag else []),
               CUDA_VISIBLE_DEVICES="")
    if cpu_flag:
        assert out.returncode == 0, out.stderr[-3000:]
        # what each rank printed; torch 2.8 to 2.10's gloo also prints "[Gloo] Rank r is connected to ..." on
        # stdout as the group forms, from both processes at once (lines cut into each other)
        assert sorted(re.findall(r"ok \d+ \d+", out.stdout)) == ["ok 0 2", "ok 1 2"], out.stdout
    else:
        assert out.returncode != 0
        assert "accelerate sees 1 process(es) but 2 were launched" in out.stderr
