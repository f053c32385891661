"""Block discovery, tracing with `torch.export`, and role discovery from the traced dataflow.

Roles are found from the graph, not from module names:
- q / k / v: the nearest linears upstream of an attention op's query, key and value inputs (a
  fused `scaled_dot_product_attention`, or an eager softmax between two matmuls);
- o: the nearest linears downstream of the attention output;
- gate / up / down: among the remaining linears, `down` consumes another one's output; of the two
  input projections of a gated MLP, `gate` is the one that passes through an activation;
- router: an input projection whose output scales what a `down` projection produced (a shared
  expert's gate, `sigmoid(g(x)) * shared_expert(x)`): a routing score, left out of the `Linear`
  target (a pattern that names it, or `role:router`, still selects it).

A fused projection (GPT-2's `c_attn`, Phi-3's `qkv_proj`) feeds several attention inputs through a
split or slice of its output features; each piece becomes its own layer, a row slice of the one
weight (`attn.c_attn[q]`, rows 0..d), so every pass sees q, k and v as it does for separate linears.
"""

from __future__ import annotations

import logging
import operator
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import torch
from torch import nn

from d2compiler.errors import TraceError, first_line
from d2compiler.graph.layers import LinearLayer, is_linear_module, slice_name

log = logging.getLogger(__name__)

ROLES = ("q", "k", "v", "o", "gate", "up", "down", "qkv", "gate_up", "router", "other")

_aten = torch.ops.aten
LINEAR_OPS = {_aten.linear.default, _aten.addmm.default, _aten.mm.default, _aten.matmul.default}
MATMUL_OPS = {_aten.matmul.default, _aten.bmm.default, _aten.einsum.default}
SDPA_OPS = {_aten.scaled_dot_product_attention.default}
SOFTMAX_OPS = {_aten._softmax.default, _aten.softmax.int, _aten._safe_softmax.default}
SPLIT_OPS = {_aten.split.Tensor, _aten.split_with_sizes.default, _aten.chunk.default}
RESHAPE_OPS = {_aten.view.default, _aten.reshape.default, _aten._unsafe_view.default}
ACTIVATION_OPS = {
    _aten.silu.default, _aten.gelu.default, _aten.relu.default, _aten.sigmoid.default,
    _aten.tanh.default, _aten.hardswish.default, _aten.mish.default, _aten.elu.default,
    _aten.leaky_relu.default,
}


@dataclass
class AttentionSite:
    """One attention op in a block: the fx node and the linears feeding each side."""

    node: str
    kind: str  # "sdpa" or "eager"
    q: list[str]
    k: list[str]
    v: list[str]
    o: list[str]
    inputs: dict[str, str] = field(default_factory=dict)  # "q"/"k"/"v" -> the fx node feeding that side


@dataclass
class BlockStructure:
    """What tracing found in one block class: roles by the linear's name inside the block, linears
    grouped by shared input (q/k/v read the same tensor), and the attention sites."""

    roles: dict[str, str]
    input_groups: list[list[str]]
    attention: list[AttentionSite] = field(default_factory=list)
    slices: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)  # fused linear -> role -> rows
    experts: list[Any] = field(default_factory=list)  # the block's expert banks (`graph.experts.ExpertBank`)
    expert_lists: dict[str, int] = field(default_factory=dict)  # the block's expert lists (`graph.expert_lists`): name -> E

    def group_of(self, name: str) -> list[str]:
        for group in self.input_groups:
            if name in group:
                return group
        return [name]


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
            sites.append(AttentionSite(name, "sdpa", owners(q), owners(k), owners(v), owners(name, False),
                                       _named(q=q, k=k, v=v)))
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
            sites.append(AttentionSite(name, "eager", owners(q_in), owners(k_in), owners(v_in), owners(vmm.name, False),
                                       _named(q=q_in, k=k_in, v=v_in)))
    return sites


def _named(**inputs: str | None) -> dict[str, str]:
    return {role: node for role, node in inputs.items() if node is not None}


def _feature_width(node: torch.fx.Node) -> int | None:
    val = node.meta.get("val")
    return int(val.shape[-1]) if isinstance(val, torch.Tensor) and val.dim() else None


def _on_last_dim(node: torch.fx.Node, dim: int) -> bool:
    val = node.all_input_nodes[0].meta.get("val")
    return isinstance(val, torch.Tensor) and dim in (-1, val.dim() - 1)


def _split_sizes(split: torch.fx.Node, width: int) -> list[int]:
    arg = split.args[1]
    if split.target == _aten.chunk.default:
        size = -(-width // int(arg))
        return [min(size, width - i) for i in range(0, width, size)]
    if isinstance(arg, int):
        return [min(arg, width - i) for i in range(0, width, arg)]
    return [int(a) for a in arg]


def output_pieces(linear: torch.fx.Node) -> list[tuple[str, int, int]]:
    """The pieces a linear's output is cut into along its feature dimension (through views that keep
    that dimension): (fx node of the piece, first row, end row). Empty when it is not cut."""
    width = _feature_width(linear)
    if width is None:
        return []
    pieces, frontier = [], [linear]
    while frontier:
        for user in frontier.pop().users:
            if user.target in RESHAPE_OPS and _feature_width(user) == width:
                frontier.append(user)
            elif user.target in SPLIT_OPS and _on_last_dim(user, user.args[2] if len(user.args) > 2 else 0):
                starts = [0]
                for size in _split_sizes(user, width):
                    starts.append(starts[-1] + size)
                pieces += [(item.name, starts[item.args[1]], starts[item.args[1] + 1])
                           for item in user.users if item.target is operator.getitem]
            elif user.target == _aten.slice.Tensor and _on_last_dim(user, user.args[1] if len(user.args) > 1 else 0):
                start = max(0, min(width, int(user.args[2]) if len(user.args) > 2 and user.args[2] is not None else 0))
                end = max(start, min(width, int(user.args[3]) if len(user.args) > 3 and user.args[3] is not None else width))
                pieces.append((user.name, start, end))
    return pieces


def fused_slices(g: nx.DiGraph, linear_nodes: dict[str, str], sites: list[AttentionSite]) -> dict[str, dict[str, tuple[int, int]]]:
    """For each linear feeding more than one of an attention op's q/k/v inputs: role -> its rows,
    found by following each piece of its cut output to the attention input it reaches. A fused
    linear whose pieces cannot all be told apart is left whole (role `qkv`)."""
    node_of = {owner: n for n, owner in linear_nodes.items()}
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for site in sites:
        for owner in {o for role in ("q", "k", "v") for o in getattr(site, role)}:
            served = [role for role in ("q", "k", "v") if owner in getattr(site, role)]
            if len(served) < 2 or owner in out:
                continue
            found: dict[str, tuple[int, int]] = {}
            for piece, start, end in output_pieces(g.nodes[node_of[owner]]["node"]):
                reached = [r for r in served if r in site.inputs and nx.has_path(g, piece, site.inputs[r])]
                if len(reached) == 1 and reached[0] not in found:
                    found[reached[0]] = (start, end)
            if set(found) == set(served):
                out[owner] = found
            else:
                log.warning("%s feeds %s of attention but its output could not be cut into them; it stays one "
                            "layer with role qkv", owner, "/".join(served))
    return out


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
    downs = {node_of[o] for o, role in roles.items() if role == "down" and o in node_of}
    for owner in list(mlp_in):
        if _scales_a_down_output(g, node_of[owner], downs, set(linear_nodes)):
            roles[owner] = "router"
            mlp_in.remove(owner)
    has_act = {
        o: any(g.nodes[u]["node"].target in ACTIVATION_OPS for u in g.successors(node_of[o])) for o in mlp_in
    }
    gated = len(mlp_in) == 2 and sum(has_act.values()) == 1
    for owner in mlp_in:
        roles[owner] = "gate" if gated and has_act[owner] else "up"
    return roles


def _scales_a_down_output(g: nx.DiGraph, start: str, downs: set[str], linears: set[str]) -> bool:
    """Whether the output of linear `start` reaches, before any other linear, a multiplication one of
    whose other operands comes from a `down` projection (a gating score, not a projection)."""
    reach = set(_nearest(g, start, linears, False)) | _downstream_until(g, start, linears)
    for node in reach:
        if g.nodes[node]["node"].target in (_aten.mul.Tensor, operator.mul):
            others = [p for p in g.predecessors(node) if p not in reach and p != start]
            if any(downs & (nx.ancestors(g, p) | {p}) for p in others):
                return True
    return False


def _downstream_until(g: nx.DiGraph, start: str, stop: set[str]) -> set[str]:
    """The nodes downstream of `start` reached without passing through a `stop` node."""
    seen, queue = {start}, deque([start])
    while queue:
        for nxt in g.successors(queue.popleft()):
            if nxt not in seen and nxt not in stop:
                seen.add(nxt)
                queue.append(nxt)
    return seen - {start}


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
        raise TraceError(trace_failure_message(block, label, exc)) from None
    modules = dict(block.named_modules())
    g = _node_graph(exported.graph)
    linear_nodes = _linear_nodes(exported, modules)
    sites = _attention_sites(g, linear_nodes)
    roles = discover_roles(g, linear_nodes, sites)
    groups = _input_groups(g, linear_nodes, set(exported.graph_signature.inputs_to_parameters))
    # The exported program is not kept: it holds the traced block's parameters, which a streaming run
    # releases after the block is done.
    return BlockStructure(roles=roles, input_groups=groups, attention=sites, slices=fused_slices(g, linear_nodes, sites))


def _model_frame(exc: BaseException) -> str | None:
    """`file:line: code` of the innermost traceback frame outside torch (the model's own code)."""
    torch_dir = str(Path(torch.__file__).parent)
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(torch_dir)]
    if not frames:
        return None
    frame = frames[-1]
    return f"{Path(frame.filename).name}:{frame.lineno}: {(frame.line or '').strip()}"


def trace_failure_message(block: nn.Module, label: str, exc: BaseException) -> str:
    """Which block, which operation (the model's source line and torch's reason), and the recipe
    lines that skip tracing by naming every linear's role."""
    reason = first_line(exc)
    where = _model_frame(exc)
    linears = [n for n, m in block.named_modules() if n and is_linear_module(m)]
    override = "\n".join(f'"{n}" = "other"' for n in linears)
    return (f"{label}: torch.export cannot trace this block" + (f" at {where}" if where else "") + f" ({reason}). "
            "To skip tracing, give every linear of the block its role (q, k, v, o, gate, up, down or other) "
            f"in the recipe:\n[model.roles]\n{override}")


def structure_from_roles(block: nn.Module, roles: dict[str, str]) -> BlockStructure:
    """A structure without tracing: every linear gets the given role or `other`, and no input
    sharing is assumed."""
    names = [n for n, m in block.named_modules() if is_linear_module(m)]
    return BlockStructure(roles={n: roles.get(n, "other") for n in names}, input_groups=[[n] for n in names])


def bind_linears(block: nn.Module, prefix: str, structure: BlockStructure, overrides: dict[str, str] | None = None) -> list[LinearLayer]:
    """The prunable linears of one block, in module order, with their roles; a fused q/k/v linear
    gives one row-slice layer per role, unless `overrides` names it."""
    overrides = overrides or {}
    out = []
    for local, module in block.named_modules():
        if not local or not is_linear_module(module):
            continue
        if local in structure.slices and local not in overrides:
            out += [LinearLayer(f"{prefix}.{slice_name(local, role)}", slice_name(local, role), module, role, rows)
                    for role, rows in structure.slices[local].items()]
        else:
            role = overrides.get(local, structure.roles.get(local, "other"))
            expert_list = next((name for name in structure.expert_lists if local.startswith(name + ".")), None)
            out.append(LinearLayer(f"{prefix}.{local}", local, module, role, expert_list=expert_list))
    return out
