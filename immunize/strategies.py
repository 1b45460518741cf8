"""FSDP2 as a trainer strategy: Lightning's ModelParallelStrategy with every process data-parallel.

    trainer:
      strategy: {class_path: immunize.strategies.FSDP2}

Lightning's ModelParallelStrategy defaults to tensor parallelism over the processes of a node; this project shards
over data-parallel ranks only (FSDP2, ZeRO-3 style: weights, gradients, optimizer state and every method's
parameter-sized buffers split N ways; lightning_modules/modeling/sharding.py), so the data-parallel size is always the number
of processes and the mesh has no tensor-parallel dimension to set.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Optional

from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.constants import default_pg_timeout


class FSDP2(ModelParallelStrategy):
    """FSDP2 over all processes (data-parallel size = nodes x devices, tensor-parallel size 1).

    Args:
        save_distributed_checkpoint: each rank writes its shard of weights and optimizer state (a folder per
            checkpoint); False gathers the full state on rank 0 into one file (needs its memory on rank 0).
        process_group_backend: nccl on GPUs, gloo on CPUs by default.
        timeout: collective timeout.
    """

    def __init__(self, save_distributed_checkpoint: bool = True, process_group_backend: Optional[str] = None,
                 timeout: Optional[timedelta] = default_pg_timeout) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()
