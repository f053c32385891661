"""The dense survey before the first block is pruned (passes with `surveys = True`, e.g. a
layer-wise sparsity allocation that must see every block first)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from d2compiler.errors import PassError
from d2compiler.execution.block_io import BlockInput
from d2compiler.execution.invariants import blamed
from d2compiler.execution.progress import progress

if TYPE_CHECKING:
    from d2compiler.execution.executor import BlockExecutor


def survey(executor: BlockExecutor, inputs: list[BlockInput], targets: dict[int, set[str]], last: int) -> None:
    """The dense sweep of the passes with `surveys = True` (e.g. a layer-wise sparsity allocation
    that must see every block before the first is pruned): blocks 0..last run dense over the
    first calibration inputs (as many as the passes' `survey_samples` ask for), each bracketed by the passes' `begin_survey` / `end_survey`, then
    `finish_survey`. The blocks are not changed (checked: a survey that writes is a PassError)."""
    surveyors = [p for p in executor.schedule if p.surveys]
    if not surveyors or last < 0:
        return
    wanted = [p.survey_samples() for p in surveyors]
    count = executor._samples[1] if None in wanted else min(max(wanted), executor._samples[1])  # over all processes
    inputs = [inp for i, inp in enumerate(inputs) if executor._samples[0] + i < count]  # this process's share of them
    for index in progress(range(last + 1), desc="survey", disable=executor.quiet):
        with executor.on_device(index) as block:
            ctx = executor.context(index, block, inputs, set(), targets, sample_count=count)
            before = ctx.fingerprints()
            outputs = ctx.bracketed_forward(surveyors, "begin_survey", "end_survey")
            changes = ctx.parameter_changes(before)
            differs = torch.stack(list(changes.values())).tolist() if changes else []
            changed = [name for name, bad in zip(changes, differs) if bad]
            if changed:
                raise PassError(f"the survey of block {index} changed {changed[0]} (passes: "
                                f"{', '.join(p.name for p in surveyors)}); a survey must only read the block")
            inputs = [inp.with_hidden(h) for inp, h in zip(inputs, outputs)] if index < last else inputs
    for p in surveyors:
        with blamed(p, "finish_survey", f"after the survey of blocks 0..{last}"):
            p.finish_survey()
