"""Lab 3 (the GPT) under Ray Train: Ray starts the processes and the process group, labkit trains.

    pip install "ray[train]"                # not a course requirement: Ray is not installed, and this file is
                                            # checked by the tests only for the options it gives the lab
    python configs/ray/train_gpt_ray.py     # on a Ray cluster: RAY_ADDRESS=... python configs/ray/train_gpt_ray.py

Ray's TorchTrainer places ``num_workers`` processes on the cluster's nodes (one GPU each), sets the
environment torch.distributed needs and calls ``init_process_group`` itself; labkit's ``run_lab``
sees a group that already exists and joins it, so the lab runs unchanged. Ray restarts failed
workers (``FailureConfig``) and keeps checkpoints (``RunConfig``); here the lab's own checkpoints on
a shared file system are used, as under torchrun.
"""

import ray.train
from ray.train.torch import TorchTrainer

WORKERS = 8


def train_loop_per_worker(config: dict) -> None:
    from labkit.labs import train_gpt

    train_gpt.main(["--world-size", str(WORKERS), "--ddp", "torch", "--dtype", "bfloat16", "--steps", "2000",
                    "--checkpoint-every", "200", "--out-dir", config["out_dir"]])


if __name__ == "__main__":
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"out_dir": "/shared/runs/train_gpt_ray"},
        scaling_config=ray.train.ScalingConfig(num_workers=WORKERS, use_gpu=True),
        run_config=ray.train.RunConfig(failure_config=ray.train.FailureConfig(max_failures=3)),
    )
    print(trainer.fit())
