"""Fully sharded data parallelism (FSDP2) under Lightning, on GPUs (NCCL) and CPUs (gloo).

Lightning's ``fsdp`` strategy wraps modules with FSDP1 and refuses the CPU; its
``ModelParallelStrategy`` leaves the sharding to the LightningModule's ``configure_model`` and
runs anywhere ``torch.distributed`` does. ``FSDPStrategy`` is that strategy with every process
in the data-parallel dimension (no tensor parallelism) and the sharding options in the trainer
config; ``shard`` applies them: one FSDP unit per transformer block, then the root (embeddings,
final norm and the head tied to the embedding).
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn


class FSDPStrategy(ModelParallelStrategy):
    """FSDP2 over all processes.

    ``cpu_offload``: keep sharded parameters, gradients and optimizer states in host memory.
    ``reshard_after_forward``: free gathered parameters after each block's forward (ZeRO-3);
    ``False`` keeps them until the backward (ZeRO-2: more memory, one all-gather less).
    Mixed precision follows ``trainer.precision``: with ``bf16-mixed`` parameters are gathered
    and used in bf16 and gradients reduced in fp32.
    """

    def __init__(
        self, cpu_offload: bool = False, reshard_after_forward: bool = True, **kwargs
    ) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, **kwargs)
        self.cpu_offload = cpu_offload
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        # Every process shards the data (the parent's "auto" would take one per node).
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        """Write the sharded checkpoint into a staging directory beside ``filepath`` and rename
        it into place once every rank has written its shard: a crash mid-write leaves the
        previous checkpoint as it was."""
        path = Path(self.broadcast(str(filepath)))
        staging = path.with_name(f".{path.name}.tmp")
        if self.global_rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        self.barrier()
        super().save_checkpoint(checkpoint, staging, storage_options)
        self.barrier()
        if self.global_rank == 0:
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            if path.exists():
                os.replace(path, old)
            os.replace(staging, path)
            shutil.rmtree(old, ignore_errors=True)
        self.barrier()


def shard(
    model: nn.Module,
    mesh,
    blocks: nn.ModuleList,
    bf16: bool,
    cpu_offload: bool = False,
    reshard_after_forward: bool = True,
    heads: list[nn.Module] | tuple = (),
) -> None:
    """Apply ``fully_shard`` to each of ``blocks``, then to ``model``, then to each of
    ``heads`` (a task's own modules outside the model, such as a classifier's linear head, whose
    gradients must be reduced over the ranks like the model's), in place."""
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    # The GPT returns its logits as a slice (padded vocabulary rows dropped); FSDP warns about
    # in-place edits of such views, which no lmforge loss makes.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

    options = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if bf16:
        options["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    for block in blocks:
        fully_shard(block, **options)
    # The root gathers the embeddings and head; after the forward it keeps them for the backward
    # (the head runs last, so resharding would gather them again at once).
    fully_shard(model, **(options | {"reshard_after_forward": False}))
    if hasattr(model, "hidden"):  # the family protocol's entry point gathers like forward
        register_fsdp_forward_method(model, "hidden")
    for head in heads:
        fully_shard(head, **(options | {"reshard_after_forward": False}))
