"""Which share of a model's parameters a recipe's passes act on, and which weights they leave alone.

A pass acts on linear layers found from each block's dataflow. Weights that are not such a layer
(a Mixture-of-Experts bank stored as one 3-D parameter, a convolution, an embedding) are never
pruned, whatever the recipe says, so a run could report "sparsity 0.5000" over its pruned layers
while most of the model stayed dense. This module measures that honestly, from the parameters
themselves:

- `targeted`: the weights of the layers some pass targets (a fused weight's slices by their rows);
- `families`: the parameters grouped by name with every index replaced by `*` (all blocks' and all
  experts' copies of one weight together), each with its size and how much of it is targeted;
- `unexplained`: the ≥ 2-D parameters inside the blocks that belong to no linear layer and that no
  pass's `ignore` names: what the recipe cannot prune and did not say it leaves alone. A run refuses
  to start when they are `REFUSE_SHARE` or more of the block parameters (`model.allow_untargeted`
  turns that into a warning)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from d2compiler.graph.blocks import other_stacks
from d2compiler.graph.layers import LinearLayer
from d2compiler.graph.targets import names_parameter

REFUSE_SHARE = 0.10  # untargetable, unignored block parameters that stop a run (share of the block parameters)
LIST_SHARE = 0.01  # untargeted weight families listed (share of all parameters)
_INDEX = re.compile(r"\.\d+(?=\.|$)")


def family_of(name: str) -> str:
    """`name` with every numeric index replaced by `*` (model.layers.3.mlp.experts.1.w1.weight ->
    model.layers.*.mlp.experts.*.w1.weight)."""
    return _INDEX.sub(".*", name)


@dataclass
class Family:
    """One weight family: all copies of a weight across blocks (and experts)."""

    name: str
    params: int
    targeted: int
    dims: int
    in_blocks: bool
    in_linear: bool  # a weight of a linear layer the passes can act on

    def line(self, total: int) -> str:
        kind = ("linear" if self.in_linear else f"{self.dims}-D, in no linear layer") if self.in_blocks else \
            f"{self.dims}-D, outside the pruned blocks"
        left = self.params - self.targeted
        return f"{self.name} ({kind}; {left:,} parameters untargeted, {left / total:.1%} of the model)"


@dataclass
class Coverage:
    total: int  # every parameter of the model
    block: int  # the >= 2-D parameters inside the blocks
    targeted: int  # the weights of the targeted layers
    unexplained: int  # >= 2-D block parameters in no linear layer and in no pass's ignore
    families: list[Family] = field(default_factory=list)
    blocks_path: str = ""
    stacks_left: list[tuple[str, int, int]] = field(default_factory=list)  # other stacks of blocks: (name, blocks, parameters)

    @property
    def share(self) -> float:
        """The targeted share of all parameters."""
        return self.targeted / self.total if self.total else 0.0

    @property
    def unexplained_share(self) -> float:
        """The unexplained share of the block parameters."""
        return self.unexplained / self.block if self.block else 0.0

    def untargeted_families(self) -> list[Family]:
        """Families with at least LIST_SHARE of all parameters untargeted, largest first."""
        return sorted((f for f in self.families if f.params - f.targeted >= LIST_SHARE * self.total),
                      key=lambda f: f.targeted - f.params)

    def lines(self) -> list[str]:
        """The report: the targeted share and every large untargeted family."""
        out = [f"passes target {self.targeted:,} of {self.total:,} parameters ({self.share:.1%})"]
        out += [f"  untargeted: {f.line(self.total)}" for f in self.untargeted_families()]
        return out

    def record(self) -> dict[str, object]:
        """The JSON form for `sparsity.json`."""
        return {"parameters": self.total, "block_parameters": self.block, "targeted": self.targeted,
                "targeted_share": round(self.share, 6), "unexplained_block_share": round(self.unexplained_share, 6),
                "untargeted_families": [{"family": f.name, "parameters": f.params - f.targeted, "dims": f.dims,
                                         "in_linear": f.in_linear} for f in self.untargeted_families()]}

    @classmethod
    def combine(cls, parts: list[Coverage]) -> Coverage:
        """The coverage of a run over several stacks (`model.blocks`) from each stack's: block, targeted
        and unexplained parameters add up; a weight family counts as inside the blocks if it is in one."""
        families: dict[str, Family] = {}
        for part in parts:
            for fam in part.families:
                merged = families.setdefault(fam.name, Family(fam.name, fam.params, 0, fam.dims, False, False))
                merged.targeted += fam.targeted
                merged.in_blocks |= fam.in_blocks
                merged.in_linear |= fam.in_linear
        return cls(parts[0].total, sum(p.block for p in parts), sum(p.targeted for p in parts), sum(p.unexplained for p in parts),
                   list(families.values()), ", ".join(p.blocks_path for p in parts), parts[0].stacks_left)

    def refusal(self) -> str | None:
        """The message that stops a run (None when the recipe's coverage is acceptable)."""
        big = [s for s in self.stacks_left if s[2] >= REFUSE_SHARE * self.total]
        if big:
            name, count, params = big[0]
            return (f"the passes act on one stack of blocks, {self.blocks_path}; the stack {name} ({count} blocks, "
                    f"{params / self.total:.1%} of the parameters) would stay dense: name the stacks to prune in order in "
                    f"model.blocks (e.g. [\"{name}\", \"{self.blocks_path}\"]), or set model.allow_untargeted = true "
                    f"to prune {self.blocks_path} only")
        if self.unexplained_share < REFUSE_SHARE:
            return None
        left = [f for f in self.untargeted_families() if not f.in_linear and f.in_blocks]
        names = "; ".join(f.line(self.total) for f in left[:4])
        return (f"the passes cannot act on {self.unexplained_share:.1%} of the block parameters, which are in no linear layer "
                f"(e.g. Mixture-of-Experts banks): {names}. Name them in a pass's `ignore` (e.g. \"re:.*experts\") to "
                "leave them dense on purpose, or set model.allow_untargeted = true to run anyway")


def measure_coverage(model: nn.Module, blocks_path: str, layers: list[LinearLayer], targeted: set[str],
                     ignore: Iterable[str], pruned_stacks: Iterable[str] = ()) -> Coverage:
    """The coverage of `targeted` (layer names) among `layers` (every block's linear layers of the
    stack `blocks_path`). `pruned_stacks`: the stacks the run prunes (`model.blocks`), none of which
    is a stack left dense."""
    ignore = list(ignore)
    def stored_in(layer: LinearLayer) -> int:  # the parameter holding the layer's weight: an expert's is its bank
        return id(layer.module.bank if layer.is_expert else layer.module.weight)

    owners = {stored_in(layer) for layer in layers if getattr(layer.module, "weight", None) is not None}
    targeted_rows: dict[int, int] = {}
    for layer in layers:
        if layer.name in targeted:
            targeted_rows[stored_in(layer)] = targeted_rows.get(stored_in(layer), 0) + layer.shape[0] * layer.shape[1]
    families: dict[str, Family] = {}
    total = block = unexplained = targeted_total = 0
    for name, param in model.named_parameters():
        count = param.numel()
        total += count
        in_blocks = name.startswith(blocks_path + ".")
        in_linear = id(param) in owners
        hit = min(targeted_rows.get(id(param), 0), count)
        targeted_total += hit
        weight = param.dim() >= 2 and not name.endswith("bias")  # an expert bank's biases are 2-D
        if in_blocks and weight:
            block += count
            if not in_linear and not names_parameter(name.rpartition(".")[0], name, ignore):
                unexplained += count
        if not weight:
            continue
        key = family_of(name)
        fam = families.setdefault(key, Family(key, 0, 0, param.dim(), in_blocks, in_linear))
        fam.params += count
        fam.targeted += hit
    left = [stack for stack in other_stacks(model, blocks_path) if stack[0] not in set(pruned_stacks)]
    return Coverage(total, block, targeted_total, unexplained, list(families.values()), blocks_path, left)
