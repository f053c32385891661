"""The public pass contract: everything a pass (shipped in `passes/` or from a plugin package) may
import from d2compiler. Code outside d2compiler should import from here only; the modules behind
these names may move.

- `Pass`, `PassParams`, `TargetedParams`, `PassResult`, `register_pass`: define and register a pass
  (see `docs/writing-a-pass.md`);
- `BlockContext`: what a pass sees of the current block (layers, `select`, `artifact`, `publish`,
  `record_mask`, `map_layers`, `reduce`, `reobserve`, `output_error_sums`);
- `LinearLayer`: one prunable linear (`weight_matrix`, `set_weight_matrix`, `stand_in`, `role`, `shape`);
- `PassError`: the error a pass raises for a problem the user can act on (exit status 2);
  `PreconditionError` from `Pass.precondition`; `Condition` is what `Pass.postconditions` returns;
  `PassOrderError` from `Pass.check_schedule`;
- `ArtifactKind`, `register_artifact`: declare an artifact kind a pass exchanges (`artifacts`);
- `UpdateVariants`: the interface of a pruning pass that honours an update plan; `PlanCost`: what a
  pass adds to `d2c plan`'s estimate;
- helpers the shipped passes share with the core: `obs_cost` and 2:4 storage (`Packed24Linear`,
  `violations_2_4`). (Attention capture, which only D²Prune's attention-KL pass uses, lives
  beside that pass in `passes/attention_capture.py`.)
"""

from __future__ import annotations

from d2compiler.errors import PassError, PassOrderError, PostconditionError, PreconditionError
from d2compiler.execution.context import obs_cost
from d2compiler.graph.layers import LinearLayer
from d2compiler.graph.packing import Packed24Linear, violations_2_4
from d2compiler.recipe.artifacts import ArtifactKind, register_artifact
from d2compiler.recipe.pass_base import (
    BlockContext,
    Condition,
    Pass,
    PassParams,
    PassResult,
    PlanCost,
    TargetedParams,
    UpdateVariants,
)
from d2compiler.recipe.registry import register_pass

__all__ = ["ArtifactKind", "BlockContext", "Condition", "LinearLayer", "Packed24Linear",
           "Pass", "PassError", "PassOrderError", "PassParams", "PassResult", "PlanCost", "PostconditionError", "PreconditionError",
           "TargetedParams", "UpdateVariants", "obs_cost", "register_artifact", "register_pass",
           "violations_2_4"]
