"""`pack_2_4`: verify that every targeted weight is exactly 2:4 and replace those linears in the
block with `Packed24Linear` (compact storage; CUDA semi-structured sparse matmul on fp16/bf16).
The experts of a 3-D Mixture-of-Experts bank are verified the same way and stay in their bank (the
model's forward indexes it): the `d2c-packed` output stores the bank packed, and it computes dense.
It must be the last pass: later passes could not change packed weights."""

from __future__ import annotations

from typing import Any

from d2compiler.contract import (
    Packed24Linear,
    Pass,
    PassError,
    PassResult,
    PreconditionError,
    TargetedParams,
    register_pass,
    violations_2_4,
)


class Pack24Params(TargetedParams):
    """`pack_2_4` has only `targets` / `ignore`."""


@register_pass
class Pack24Pass(Pass):
    name = "pack_2_4"
    Params = Pack24Params
    provides = frozenset({"packed"})
    final = True
    summary = "Check exact 2:4 sparsity and store the targeted linears packed (values + 2-bit positions)."

    def check_layers(self, layers: list[Any]) -> None:
        bad = sorted({f"{layer.local_name} ({layer.shape[1]})" for layer in layers if layer.shape[1] % 8})
        if bad:
            raise PassError(f"pack_2_4: in_features must be a multiple of 8 to pack; not so for {', '.join(bad)}")

    def _layers(self, ctx: Any) -> list[Any]:
        return list({layer.owner: layer.whole() for layer in ctx.select(self.params)}.values())  # a fused linear packs whole

    def precondition(self, ctx: Any) -> None:
        """Every targeted weight is exactly 2:4 along its input dimension."""
        bad = {layer.name: violations_2_4(layer.weight_matrix()) for layer in self._layers(ctx)}
        bad = {name: count for name, count in bad.items() if count}
        if bad:
            listing = "; ".join(f"{name}: {count} groups of 4 with more than 2 nonzeros" for name, count in bad.items())
            raise PreconditionError(f"pack_2_4: not exactly 2:4 ({listing}); prune them with mask_structure = \"2:4\" first")

    def apply(self, ctx: Any) -> PassResult:
        result = PassResult(modified=False)
        for layer in self._layers(ctx):
            if not layer.is_expert:  # an expert of a 3-D bank stays in its bank, checked 2:4 (the output packs the bank)
                ctx.module.set_submodule(layer.local_name, Packed24Linear.replacing(layer.module, layer.weight_matrix(),
                                                                                    layer.transposed))
            result.layers[layer.name] = {"packed": "2:4"}
            result.modified = True
        return result
