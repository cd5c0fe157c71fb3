"""The processes a kdbench command runs in: one, or N started by ``torchrun`` / ``accelerate launch``.

:func:`current_ranks` reads the launcher's environment (``WORLD_SIZE`` > 1) and joins the process
group through accelerate's ``PartialState`` (gloo on CPU, NCCL on GPU; the group a training run has
already started is reused). Everything kdbench does across ranks goes through :class:`Ranks`:
``barrier``, ``on_main`` (run a step on rank 0 only, every rank gets its result or its error) and
``device`` (``cuda:LOCAL_RANK`` on GPU machines, else CPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

from kdbench.errors import KdbenchError

# ranks wait for each other at a barrier while the slowest finishes its share of the generations:
# far longer than the 10-30 minute default of NCCL / gloo
BARRIER_TIMEOUT = timedelta(hours=12)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the command's processes (``rank`` of ``world_size``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        """Wait until every rank reaches this point (nothing with one process)."""
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def on_main(self, step: Callable[[], Any]) -> Any:
        """Run ``step`` on rank 0 only and return its (picklable) result on every rank. When it raises a
        kdbench error (a user's mistake: one sentence, exit 2), every rank raises the same error, so no
        rank is left waiting for the others at a barrier."""
        if not self.distributed:
            return step()
        import torch.distributed as dist

        box: list = [None]
        if self.is_main:
            try:
                box[0] = ("ok", step())
            except KdbenchError as err:
                box[0] = ("error", err)
        dist.broadcast_object_list(box, src=0)
        status, value = box[0]
        if status == "error":
            raise value
        return value

    def device(self):
        """Where this rank's model goes: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
        import torch

        return torch.device(f"cuda:{self.local_rank}") if torch.cuda.is_available() else torch.device("cpu")

    def share(self, items: list) -> list:
        """This rank's share of ``items``: every ``world_size``-th item from position ``rank`` (strided, so
        that a file sorted by length gives every rank similar lengths)."""
        return list(items[self.rank::self.world_size])


def current_ranks() -> Ranks:
    """The ranks of this command: one process unless a launcher set ``WORLD_SIZE`` > 1, in which case the
    process group is joined (or the running one reused)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world_size <= 1:
        return Ranks()
    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    # without cpu=True accelerate sees no multi-CPU launch under torchrun and stays one process
    cpu = not torch.cuda.is_available()
    if dist.is_available() and dist.is_initialized():
        state = PartialState(cpu=cpu)
    else:
        state = PartialState(cpu=cpu, timeout=BARRIER_TIMEOUT)
    return Ranks(rank=state.process_index, world_size=state.num_processes, local_rank=state.local_process_index)
