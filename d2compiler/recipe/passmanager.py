"""The requires/provides scheduler: `PassManager` builds a recipe's passes from a `PassRegistry`
and orders them with networkx so that every requirement is provided earlier, keeping the recipe
order wherever dependencies allow, and rejects an impossible recipe before any model is loaded.
"""

from __future__ import annotations

import networkx as nx

from d2compiler.errors import PassOrderError
from d2compiler.recipe.artifacts import ARTIFACTS
from d2compiler.recipe.pass_base import Pass, PassParams
from d2compiler.recipe.registry import PassRegistry, default_registry


class PassManager:
    """Builds the pass instances of a recipe and orders them by their requires/provides edges."""

    def __init__(self, params_list: list[PassParams], registry: PassRegistry | None = None):
        self.registry = registry = registry or default_registry()
        self.passes: list[Pass] = [registry.get(p.type)(p) for p in params_list]
        for p in self.passes:
            p.origin = registry.origin(p.name)
        _check_artifact_kinds(self.passes)
        self.schedule: list[Pass] = self._order()

    def _order(self) -> list[Pass]:
        graph = nx.DiGraph()
        graph.add_nodes_from(range(len(self.passes)))
        for i, consumer in enumerate(self.passes):
            for artifact in sorted(consumer.requires):
                providers = [j for j, p in enumerate(self.passes) if artifact in p.provides and j != i]
                if not providers:
                    offered = sorted({a for p in self.passes for a in p.provides}) or ["nothing"]
                    hint = _provider_hint(artifact, self.registry)
                    raise PassOrderError(
                        f"passes[{i}] ({consumer.name}) requires '{artifact}', which no pass in "
                        f"the recipe provides (provided: {', '.join(offered)}).{hint}"
                    )
                # Prefer the nearest earlier provider; otherwise the first later one.
                earlier = [j for j in providers if j < i]
                graph.add_edge(max(earlier) if earlier else min(providers), i)
        for i, consumer in enumerate(self.passes):
            for artifact in sorted(consumer.optional):
                for j, p in enumerate(self.passes):
                    if artifact in p.provides and j != i:
                        graph.add_edge(j, i)
        try:
            order = list(nx.lexicographical_topological_sort(graph))
        except nx.NetworkXUnfeasible as exc:
            raise PassOrderError(f"the passes' requirements form a cycle: {exc}") from exc
        schedule = [self.passes[i] for i in order]
        _check_final_and_quantization_order(schedule)
        _check_artifacts(schedule, self.registry)
        for p in schedule:
            p.check_schedule(schedule)
        return schedule


def _check_artifact_kinds(passes: list[Pass]) -> None:
    """Every artifact a pass names is a registered kind."""
    for p in passes:
        for name in sorted(p.requires | p.optional | p.provides | p.writes | p.consumed):
            if name not in ARTIFACTS:
                raise PassOrderError(f"pass '{p.name}' names the artifact '{name}', which is not a registered kind "
                                     f"(known: {', '.join(sorted(ARTIFACTS))}); register it with d2compiler.contract.register_artifact")


def _check_artifacts(schedule: list[Pass], registry: PassRegistry) -> None:
    """What a pass provides to be `consumed` is used by a later pass."""
    for i, p in enumerate(schedule):
        for name in sorted(p.consumed):
            users = [q.name for q in schedule[i + 1 :] if name in q.requires | q.optional]
            if not users:
                makers = registry.names_where(lambda cls, name=name: name in cls.requires | cls.optional)
                raise PassOrderError(f"pass '{p.name}' provides '{name}', but no later pass uses it, so it would do nothing; "
                                     f"add a pass of type {makers} after it")


def _check_final_and_quantization_order(schedule: list[Pass]) -> None:
    """A pass that moves weights after a quantization pass would take them off their grid, and a
    `final` pass (packing) must come last."""
    for p in schedule[:-1]:
        if p.final:
            raise PassOrderError(f"pass '{p.name}' must be the last pass (it changes how weights are stored); "
                                 f"the schedule is {' -> '.join(q.name for q in schedule)}")
    for i, first in enumerate(schedule):
        for later in schedule[i + 1 :]:
            if first.quantizes and later.updates_weights and not later.quantizes:
                raise PassOrderError(
                    f"pass '{later.name}' comes after '{first.name}': its weight update would move the quantized "
                    "weights off their integer grid; put pruning passes before quantization passes"
                )


def _provider_hint(artifact: str, registry: PassRegistry) -> str:
    names = registry.names_where(lambda cls: artifact in cls.provides)
    return f" Add a pass of type {names} before it." if names else ""
