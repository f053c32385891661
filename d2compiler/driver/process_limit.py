"""How many processes `d2c run --nproc N` may start on this machine, decided before any starts.

On CUDA each process takes one GPU, so N is at most the GPUs present (NCCL cannot put two processes
of one group on one GPU). On the CPU N is at most the cores this process may run on (more only
share them and slow every process down). On both, N processes must fit in the memory available
now: each needs the peak `d2c plan` estimates for the recipe (the model is loaded once for that,
here, before anything starts). `--oversubscribe` lifts the core and memory limits for people who
know better; the GPU limit stays."""

from __future__ import annotations

import logging
import os

from pydantic import BaseModel

from d2compiler.errors import D2Error
from d2compiler.execution.memory import available_memory_mb

OVERRIDE = "--oversubscribe"
log = logging.getLogger(__name__)


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def process_peak_mb(recipe: BaseModel) -> float:
    """The peak memory one process of the run needs: `d2c plan`'s estimate."""
    from d2compiler.driver.plan import make_plan

    return make_plan(recipe).estimate_mb["peak (sum)"]


def check_nproc(nproc: int, recipe: BaseModel, *, oversubscribe: bool = False) -> None:
    """Raise a `D2Error` naming the limit when `nproc` processes do not fit this machine."""
    import torch

    from d2compiler.loading.dtypes import resolve_device

    if resolve_device(recipe.model.device).type == "cuda":
        gpus = torch.cuda.device_count()
        if nproc > gpus:
            raise D2Error(f"--nproc {nproc}: this machine has {gpus} GPU(s) and each process takes one: "
                          f"use --nproc {gpus} or fewer")
    elif not oversubscribe and nproc > (cores := usable_cores()):
        raise D2Error(f"--nproc {nproc}: this machine has {cores} CPU core(s) for this run: use --nproc {cores} or "
                      f"fewer (more processes share the cores and each holds the model), or {OVERRIDE}")
    if oversubscribe:
        return
    available = available_memory_mb()
    if available is None:
        return
    log.info("--nproc %d: estimating the memory of one process (d2c plan loads the model once)", nproc)
    need = process_peak_mb(recipe)
    if nproc * need > available:
        fits = int(available // need)
        raise D2Error(f"--nproc {nproc}: each process needs about {need:,.0f} MiB (the peak `d2c plan` estimates for "
                      f"this recipe) and {available:,.0f} MiB is available: use --nproc {max(fits, 1)} or fewer"
                      f"{' (or model.streaming = true)' if fits < 2 else ''}, or {OVERRIDE}")
