"""The public pass contract: everything a pass (shipped in `passes/` or from a plugin package) may
import from d2compiler. Code outside d2compiler should import from here only; the modules behind
these names may move.

- `Pass`, `PassParams`, `TargetedParams`, `PassResult`, `register_pass`: define and register a pass
  (see `docs/writing-a-pass.md`);
- `BlockContext`: what a pass sees of the current block (layers, `select`, `artifact`, `publish`,
  `record_mask`, `map_layers`, `reduce`);
- `LinearLayer`: one prunable linear (`weight_matrix`, `set_weight_matrix`, `role`, `shape`);
- `PassError`: the error a pass raises for a problem the user can act on (exit status 2);
  `PreconditionError` from `Pass.precondition`; `Condition` is what `Pass.postconditions` returns.
"""

from __future__ import annotations

from .errors import PassError, PostconditionError, PreconditionError
from .executor import BlockContext
from .graph import LinearLayer
from .passmanager import Condition, Pass, PassParams, PassResult, TargetedParams, register_pass

__all__ = ["BlockContext", "Condition", "LinearLayer", "Pass", "PassError", "PassParams", "PassResult", "PostconditionError",
           "PreconditionError", "TargetedParams", "register_pass"]
