"""Block discovery, tracing with `torch.export`, and role discovery from the traced dataflow.

Roles are found from the graph, not from module names:
- q / k / v: the nearest linears upstream of an attention op's query, key and value inputs (a
  fused `scaled_dot_product_attention`, or an eager softmax between two matmuls);
- o: the nearest linears downstream of the attention output;
- gate / up / down: among the remaining linears, `down` consumes another one's output; of the two
  input projections of a gated MLP, `gate` is the one that passes through an activation.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
from torch import nn

from .errors import TraceError

log = logging.getLogger(__name__)

ROLES = ("q", "k", "v", "o", "gate", "up", "down", "qkv", "other")

_aten = torch.ops.aten
LINEAR_OPS = {_aten.linear.default, _aten.addmm.default, _aten.mm.default, _aten.matmul.default}
MATMUL_OPS = {_aten.matmul.default, _aten.bmm.default, _aten.einsum.default}
SDPA_OPS = {_aten.scaled_dot_product_attention.default}
SOFTMAX_OPS = {_aten._softmax.default, _aten.softmax.int, _aten._safe_softmax.default}
ACTIVATION_OPS = {
    _aten.silu.default, _aten.gelu.default, _aten.relu.default, _aten.sigmoid.default,
    _aten.tanh.default, _aten.hardswish.default, _aten.mish.default, _aten.elu.default,
    _aten.leaky_relu.default,
}


def is_linear_module(module: nn.Module) -> bool:
    """nn.Linear, or a transformers `Conv1D` (a linear with a transposed (in, out) weight)."""
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None


def weight_is_transposed(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


@dataclass
class AttentionSite:
    """One attention op in a block: the fx node and the linears feeding each side."""

    node: str
    kind: str  # "sdpa" or "eager"
    q: list[str]
    k: list[str]
    v: list[str]
    o: list[str]


@dataclass
class BlockStructure:
    """What tracing found in one block class: roles by the linear's name inside the block, linears
    grouped by shared input (q/k/v read the same tensor), and the attention sites."""

    roles: dict[str, str]
    input_groups: list[list[str]]
    attention: list[AttentionSite] = field(default_factory=list)
    graph: nx.DiGraph | None = None
    exported: Any = None

    def group_of(self, name: str) -> list[str]:
        for group in self.input_groups:
            if name in group:
                return group
        return [name]


@dataclass
class LinearLayer:
    """A prunable linear of a block, bound to its module."""

    name: str  # full module name
    local_name: str  # name inside the block
    module: nn.Module
    role: str

    @property
    def transposed(self) -> bool:
        return weight_is_transposed(self.module)

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features)."""
        w = self.module.weight
        return (w.shape[1], w.shape[0]) if self.transposed else (w.shape[0], w.shape[1])

    def weight_matrix(self) -> torch.Tensor:
        """The weight as an (out, in) view of the parameter data (no copy)."""
        w = self.module.weight.data
        return w.t() if self.transposed else w

    def set_weight_matrix(self, value: torch.Tensor) -> None:
        """Write an (out, in) matrix back, in the parameter's dtype and device."""
        target = self.weight_matrix()
        target.copy_(value.to(dtype=target.dtype, device=target.device))


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated blocks: the ModuleList of same-class modules holding linears with the most
    parameters (decoder layers, encoder layers, ViT layers)."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(child) for child in module}
        if len(classes) != 1 or not any(is_linear_module(m) for m in module[0].modules()):
            continue
        count = sum(p.numel() for p in module.parameters())
        if best is None or count > best[0]:
            best = (count, name, module)
    if best is None:
        raise TraceError(
            f"{type(model).__name__}: found no repeated blocks (an nn.ModuleList of identical "
            "layers containing nn.Linear); this model is not supported"
        )
    return best[1], best[2]


def _node_graph(gm_graph: torch.fx.Graph) -> nx.DiGraph:
    g = nx.DiGraph()
    for node in gm_graph.nodes:
        g.add_node(node.name, node=node)
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return g


def _nearest(g: nx.DiGraph, start: str, stop: set[str], upstream: bool) -> list[str]:
    """Nodes in `stop` reachable from `start` without passing through another `stop` node."""
    step = g.predecessors if upstream else g.successors
    seen, found, queue = {start}, [], deque([start])
    while queue:
        for nxt in step(queue.popleft()):
            if nxt in seen:
                continue
            seen.add(nxt)
            if nxt in stop:
                found.append(nxt)
            else:
                queue.append(nxt)
    return found


def _linear_nodes(exported: Any, modules: dict[str, nn.Module]) -> dict[str, str]:
    """fx node name -> linear module name (inside the block), via the weight parameter's name."""
    params = exported.graph_signature.inputs_to_parameters
    out: dict[str, str] = {}
    for node in exported.graph.nodes:
        if node.op != "call_function" or node.target not in LINEAR_OPS:
            continue
        for arg in node.all_input_nodes:
            fqn = params.get(arg.name)
            if fqn and fqn.endswith(".weight"):
                owner = fqn[: -len(".weight")]
                if owner in modules and is_linear_module(modules[owner]):
                    out[node.name] = owner
    return out


def _attention_sites(g: nx.DiGraph, linear_nodes: dict[str, str]) -> list[AttentionSite]:
    stop = set(linear_nodes)
    sites = []

    def owners(node_name: str | None, upstream: bool = True) -> list[str]:
        if node_name is None:
            return []
        found = _nearest(g, node_name, stop, upstream)
        if upstream and node_name in stop:
            found = [node_name]
        return sorted({linear_nodes[n] for n in found})

    for name in nx.topological_sort(g):
        node = g.nodes[name]["node"]
        if node.op != "call_function":
            continue
        if node.target in SDPA_OPS:
            q, k, v = (a.name if isinstance(a, torch.fx.Node) else None for a in node.args[:3])
            sites.append(AttentionSite(name, "sdpa", owners(q), owners(k), owners(v), owners(name, False)))
        elif node.target in SOFTMAX_OPS:
            scores = _nearest(g, name, {n for n in g if g.nodes[n]["node"].target in MATMUL_OPS}, True)
            values = [
                n for n in g.successors(name) if g.nodes[n]["node"].target in MATMUL_OPS
            ] or _nearest(g, name, {n for n in g if g.nodes[n]["node"].target in MATMUL_OPS}, False)
            if not scores or not values:
                continue
            smm, vmm = g.nodes[scores[0]]["node"], g.nodes[values[0]]["node"]
            q_in, k_in = (a.name for a in smm.args[:2])
            v_in = vmm.args[1].name
            sites.append(AttentionSite(name, "eager", owners(q_in), owners(k_in), owners(v_in), owners(vmm.name, False)))
    return sites


def discover_roles(g: nx.DiGraph, linear_nodes: dict[str, str], sites: list[AttentionSite]) -> dict[str, str]:
    """Assign a role to every linear (see the module docstring)."""
    roles: dict[str, str] = {}
    for site in sites:
        for role in ("q", "k", "v"):
            for owner in getattr(site, role):
                roles[owner] = "qkv" if owner in roles and roles[owner] != role else role
        for owner in site.o:
            roles.setdefault(owner, "o")
    node_of = {owner: n for n, owner in linear_nodes.items()}
    rest = [owner for owner in node_of if owner not in roles]
    rest_nodes = {node_of[o] for o in rest}
    mlp_in = []
    for owner in rest:
        upstream = _nearest(g, node_of[owner], set(linear_nodes), True)
        if any(u in rest_nodes for u in upstream):
            roles[owner] = "down"
        else:
            mlp_in.append(owner)
    has_act = {
        o: any(g.nodes[u]["node"].target in ACTIVATION_OPS for u in g.successors(node_of[o])) for o in mlp_in
    }
    gated = len(mlp_in) == 2 and sum(has_act.values()) == 1
    for owner in mlp_in:
        roles[owner] = "gate" if gated and has_act[owner] else "up"
    return roles


def _input_groups(g: nx.DiGraph, linear_nodes: dict[str, str], params: set[str]) -> list[list[str]]:
    """Linears reading the same activation tensor (q/k/v, gate/up) share calibration statistics."""
    by_input: dict[str, list[str]] = {}
    for n, owner in linear_nodes.items():
        data_inputs = [a for a in g.predecessors(n) if a not in params]
        key = data_inputs[0] if len(data_inputs) == 1 else n
        by_input.setdefault(key, []).append(owner)
    return [sorted(set(group)) for group in by_input.values()]


def trace_block(block: nn.Module, args: tuple, kwargs: dict[str, Any], *, label: str) -> BlockStructure:
    """Export `block` with `torch.export(strict=False)` on real inputs and analyse its dataflow."""
    try:
        exported = torch.export.export(block, args, kwargs, strict=False)
    except Exception as exc:  # torch.export raises many error types
        op = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TraceError(
            f"{label}: torch.export failed: {op}. Override the roles with `model.roles` in the "
            "recipe (a linear's name inside the block -> q, k, v, o, gate, up, down or other) to "
            "skip tracing for this model."
        ) from None
    modules = dict(block.named_modules())
    g = _node_graph(exported.graph)
    linear_nodes = _linear_nodes(exported, modules)
    sites = _attention_sites(g, linear_nodes)
    roles = discover_roles(g, linear_nodes, sites)
    return BlockStructure(roles=roles, input_groups=_input_groups(g, linear_nodes, set(exported.graph_signature.inputs_to_parameters)), attention=sites, graph=g, exported=exported)


def structure_from_roles(block: nn.Module, roles: dict[str, str]) -> BlockStructure:
    """A structure without tracing: every linear gets the given role or `other`, and no input
    sharing is assumed."""
    names = [n for n, m in block.named_modules() if is_linear_module(m)]
    return BlockStructure(roles={n: roles.get(n, "other") for n in names}, input_groups=[[n] for n in names])


def bind_linears(block: nn.Module, prefix: str, structure: BlockStructure, overrides: dict[str, str] | None = None) -> list[LinearLayer]:
    """The prunable linears of one block, in module order, with their roles."""
    overrides = overrides or {}
    out = []
    for local, module in block.named_modules():
        if local and is_linear_module(module):
            role = overrides.get(local, structure.roles.get(local, "other"))
            out.append(LinearLayer(f"{prefix}.{local}", local, module, role))
    return out


def block_signature(block: nn.Module) -> tuple:
    """Blocks with the same class and parameter shapes share one traced structure."""
    return (type(block).__qualname__, tuple((n, tuple(p.shape)) for n, p in block.named_parameters()))


def matches(layer: LinearLayer, patterns: Iterable[str]) -> bool:
    """Whether a layer matches any targets/ignore pattern (class name, exact name, role:, re:)."""
    import re

    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], layer.name):
                return True
        elif pattern.startswith("role:"):
            if layer.role == pattern[5:]:
                return True
        elif pattern in (type(layer.module).__name__, layer.name, layer.local_name):
            return True
    return False
