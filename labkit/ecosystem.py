"""The tools of distributed training the sources name, placed on the course's lessons (lesson 10).

Each entry says what the tool does, in which lessons the course builds the same idea from scratch, and with which
labkit module. ``LESSONS`` names the lessons; :func:`labkit.ecosystem_figures.ecosystem_figure` draws the map.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Tool", "TOOLS", "LESSONS"]

LESSONS = {1: "data parallel", 2: "collectives", 3: "DDP", 4: "large batch", 5: "tensor parallel", 6: "pipeline",
           7: "parameter server", 8: "memory, ZeRO, FSDP", 9: "communication", 10: "failures, clusters"}


@dataclass(frozen=True)
class Tool:
    name: str
    what: str
    lessons: tuple[int, ...]
    labkit: str


TOOLS = (
    Tool("PyTorch DDP / FSDP", "data parallelism with bucketed, overlapped all-reduce (DDP); parameters, gradients and "
         "optimizer state sharded by unit (FSDP); communication hooks; torch.distributed.checkpoint",
         (1, 2, 3, 8, 9, 10), "ddp, fsdp, compression, sharded_checkpoint"),
    Tool("torchrun (torch.distributed.elastic)", "starts one process per GPU on each node, rendezvous, restarts "
         "failed workers", (3, 10), "launcher, labs/elastic"),
    Tool("Horovod", "ring all-reduce over MPI, NCCL or gloo for TensorFlow, PyTorch and MXNet; tensor fusion "
         "(buckets); an optimizer wrapper that averages gradients", (2, 3), "collectives, ddp"),
    Tool("BytePS", "all-reduce inside a machine, summation on CPU servers between machines: a parameter server "
         "used for the bandwidth of the servers' links", (7, 9), "param_server, hierarchical"),
    Tool("DeepSpeed", "ZeRO stages 1-3 and offload, pipeline parallelism, mixed precision, LAMB and 1-bit "
         "Adam/LAMB compression", (4, 6, 8, 9), "zero, fsdp, pipeline, optim, compression"),
    Tool("Megatron-LM", "tensor parallelism of transformer layers, pipeline parallelism with interleaved 1F1B, "
         "sequence parallelism, combined with data parallelism", (5, 6), "tensor_parallel, pipeline"),
    Tool("TensorFlow distribution strategies", "MirroredStrategy (all-reduce on one machine), "
         "MultiWorkerMirroredStrategy, ParameterServerStrategy, TPUStrategy", (1, 2, 7), "data_parallel, "
         "collectives, param_server"),
    Tool("MXNet KVStore", "a parameter server (dist_sync, dist_async) built into the framework; Apache MXNet was "
         "retired in 2023", (7,), "param_server"),
    Tool("Ray Train", "places workers on a cluster, sets up torch.distributed, restarts failed workers, keeps "
         "checkpoints", (10,), "configs/ray"),
    Tool("Hugging Face accelerate", "one training script for CPU, one or many GPUs and TPUs; wraps DDP, FSDP and "
         "DeepSpeed; mixed precision", (3, 8), "configs/accelerate, labs"),
)
