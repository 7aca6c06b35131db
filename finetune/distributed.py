"""The process layout of a run, asked of accelerate (which reads torchrun's, MPI's and DeepSpeed's variables and
joins the process group) instead of one environment variable: how many processes, which one writes the run
folder's shared files, and a check that every rank trains from the same prepared data and checkpoint."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import accelerate.utils.other as accelerate_unwrapping
import torch
from accelerate import PartialState
from accelerate.utils import DistributedType, gather_object, is_deepspeed_available

from finetune.errors import UserError
from finetune.recipe import DEFAULT_DDP_TIMEOUT_S

WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def use_cpu() -> bool:
    """Without CUDA or MPS, ranks run as gloo CPU processes (also under `accelerate launch --multi_gpu`)."""
    return not (torch.cuda.is_available() or torch.backends.mps.is_available())


@contextmanager
def process_group(timeout_s: int = DEFAULT_DDP_TIMEOUT_S) -> Iterator[PartialState]:
    """This process's place in the launch (one process when nothing launched it), for the block: joins the process
    group, whose collectives give up after `timeout_s` (a rank that waits longer for another exits with an error),
    and leaves it at the end (a rank exiting with gloo's threads still running can abort at exit)."""
    check_launch()
    state = PartialState(cpu=use_cpu(), timeout=timedelta(seconds=timeout_s))
    try:
        yield state
    finally:
        state.destroy_process_group()


def is_main_process() -> bool:
    """Whether this is the launch's main process: the one that writes the run folder's shared files."""
    return PartialState().is_main_process


def main_print(message: str) -> None:
    """Print once per launch, from the main process (inside `process_group`)."""
    if is_main_process():
        print(message)


def check_launch() -> None:
    """`accelerate launch` with a MULTI_CPU config and no MPI launcher starts one plain process per machine, each
    believing it is alone: every one would prepare, train on all the data and write the same run folder."""
    launched = "ACCELERATE_DYNAMO_BACKEND" in os.environ  # set by every accelerate launcher
    grouped = any(name in os.environ for name in WORLD_SIZE_VARIABLES)
    if launched and "MASTER_ADDR" in os.environ and not grouped:
        raise UserError(
            "this process was started by 'accelerate launch' for a multi-process run (MASTER_ADDR is set) but "
            "nothing gave it a rank or a world size: accelerate's MULTI_CPU setup starts one process per machine "
            "and needs an MPI launcher (--mpirun_hostfile) to join them. Without MPI, start gloo CPU ranks with "
            "--multi_gpu (make train NPROC=n [NNODES=...]), which runs torchrun. (--cpu also makes accelerate start "
            "plain processes in place of a DeepSpeed or FSDP setup: leave it out; without CUDA ranks run on the CPU.)")


def same_on_every_rank(state: PartialState, what: str, value: str, fix: str) -> None:
    """Fail on every rank, naming the ranks that differ, unless all ranks hold the main process's `value`."""
    if state.num_processes == 1:
        return
    values = gather_object([(state.process_index, value)])
    main_value = values[0][1]
    differing = [rank for rank, v in values if v != main_value]
    if differing:
        raise UserError(f"rank(s) {', '.join(map(str, differing))} see a different {what} than rank 0 "
                        f"({main_value}): {fix}")


def same_prepared_data(state: PartialState, fingerprint: str) -> None:
    same_on_every_rank(state, "prepared data", fingerprint,
                       "prepare every node from the same sources and recipe, or share the run folder")


def allow_fsdp_on_cpu() -> None:
    """accelerate (1.15) takes up its FSDP plugin only for GPU-family process groups: an FSDP launch on CPU ranks
    would silently run as plain data parallel. torch's FSDP2 works over gloo, so before the Trainer builds its
    Accelerator, an FSDP launch's CPU group is presented as one that may take FSDP (for the rest of the process:
    accelerate's FSDP save and load paths read it again)."""
    shared = PartialState._shared_state
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and \
            shared.get("distributed_type") == DistributedType.MULTI_CPU:
        shared["distributed_type"] = DistributedType.MULTI_GPU


def import_deepspeed_only_if_used(used: bool) -> None:
    """accelerate imports DeepSpeed, when it is installed, every time it unwraps a model (to recognise a DeepSpeed
    engine), and DeepSpeed's import logs "Setting accelerator to CPU" on a machine without CUDA. A run that does
    not use DeepSpeed has no such engine: accelerate's unwrapping is told that DeepSpeed is absent (for the rest
    of the process, or until a run that uses it)."""
    accelerate_unwrapping.is_deepspeed_available = is_deepspeed_available if used else lambda: False
