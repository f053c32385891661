"""Which passes a recipe can name: a `PassRegistry` object, filled by the shipped `passes` package
and the plugins' entry points, and handed to the `PassManager`.

Registering leaves the pass class as it is: the registry keeps, beside it, the recipe model of its
parameters (the pass's `Params` with `type` fixed to the pass name, so that recipes validate as a
discriminated union and `d2c schema` documents each pass separately) and where it came from (a
plugin's entry point and distribution, for error messages).
"""

from __future__ import annotations

import importlib
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, create_model

from d2compiler.errors import PluginError
from d2compiler.recipe.pass_base import Pass, PassParams

PLUGIN_GROUP = "d2compiler.passes"
SHIPPED_PASSES = "passes"  # the package of the passes that ship with d2compiler, discovered like a plugin


class PassRegistry:
    """Pass classes by recipe name, each with its recipe params model and its origin."""

    def __init__(self) -> None:
        self._types: dict[str, type[Pass]] = {}
        self._params: dict[str, type[PassParams]] = {}
        self._origins: dict[str, str] = {}
        self._loading: str | None = None  # the plugin being imported (its registrations come from it)

    def register(self, cls: type[Pass]) -> type[Pass]:
        """Make `cls` available under `cls.name` (again for the same class: nothing). ValueError for a
        name already taken by another class or a default its own field refuses."""
        first = self._types.get(cls.name)
        if first is cls:
            return cls
        if first is not None:
            raise ValueError(f"pass name {cls.name!r} registered twice ({first.__module__}.{first.__qualname__} and "
                             f"{cls.__module__}.{cls.__qualname__})")
        title = "".join(part.capitalize() for part in cls.name.split("_")) + "Pass"
        params = create_model(
            title,
            __base__=cls.Params,
            __doc__=f"`{cls.name}`: {cls.summary or cls.__doc__ or ''}".strip(),
            type=(Literal[cls.name], Field(description=f"Always '{cls.name}'.")),  # type: ignore[valid-type]
        )
        check_defaults(params, cls.name)
        self._types[cls.name], self._params[cls.name] = cls, params
        if self._loading is not None:
            self._origins[cls.name] = self._loading
        return cls

    def unregister(self, name: str) -> None:
        self._types.pop(name, None)
        self._params.pop(name, None)
        self._origins.pop(name, None)

    @contextmanager
    def temporarily(self, *classes: type[Pass]) -> Iterator[list[type[Pass]]]:
        """`classes` registered for the duration of the `with` block (tests, embedding)."""
        added = [cls for cls in classes if self._types.get(cls.name) is not cls]
        for cls in added:
            self.register(cls)
        try:
            yield list(classes)
        finally:
            for cls in added:
                self.unregister(cls.name)

    def __contains__(self, name: str) -> bool:
        return name in self._types

    def get(self, name: str) -> type[Pass]:
        return self._types[name]

    def types(self) -> dict[str, type[Pass]]:
        """Every registered pass class by name, sorted."""
        return dict(sorted(self._types.items()))

    def params_models(self) -> tuple[type[PassParams], ...]:
        """The recipe models of every registered pass's parameters, sorted by name."""
        return tuple(self._params[name] for name in sorted(self._params))

    def origin(self, name: str) -> str | None:
        """Where a plugin pass came from ("plugin 'x' (group: value, from dist 1.0)"); None if shipped."""
        return self._origins.get(name)

    def names_where(self, test: Callable[[type[Pass]], bool]) -> str:
        """The registered pass types for which `test(cls)` holds, for a message ("'a' or 'b'"; "" if none)."""
        return " or ".join(repr(name) for name, cls in self.types().items() if test(cls))


def check_defaults(params: type[BaseModel], name: str) -> None:
    """Raise ValueError when a default of `params` breaks its own field's constraints (pydantic does
    not validate defaults), e.g. a NaN default of a field declared `ge=0`."""
    for field_name, info in params.model_fields.items():
        if info.is_required() or info.default_factory is not None or info.default is None:
            continue
        try:
            TypeAdapter(Annotated[info.annotation, info], config=ConfigDict(allow_inf_nan=False)).validate_python(info.default)
        except ValidationError as exc:
            problem = exc.errors()[0]["msg"]
            raise ValueError(f"pass {name!r}: the default of {field_name} ({info.default!r}) is invalid: {problem}") from None


PASSES = PassRegistry()  # the registry `register_pass` fills and the command line uses
_plugins_loaded = False


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make `cls` available to recipes under `cls.name` (in `PASSES`)."""
    return PASSES.register(cls)


def load_plugins(registry: PassRegistry = PASSES) -> None:
    """Import the passes other packages declare in the `d2compiler.passes` entry-point group (once).
    An entry point names a module that registers its passes on import, or a `Pass` subclass, which is
    registered here. A plugin that fails to load is a `PluginError` naming it."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    for point in entry_points(group=PLUGIN_GROUP):
        where = f"plugin {point.name!r} ({PLUGIN_GROUP}: {point.value}"
        dist = getattr(point, "dist", None)
        where += f", from {dist.name} {dist.version})" if dist is not None else ")"
        registry._loading = where
        try:
            _load_plugin(registry, point, where)
        finally:
            registry._loading = None


def _load_plugin(registry: PassRegistry, point: object, where: str) -> None:
    try:
        loaded = point.load()  # type: ignore[attr-defined]
    except SystemExit as exc:
        raise PluginError(f"{where} called sys.exit({exc.code!r}) while loading") from None
    except Exception as exc:  # a third party's import error, whatever its type
        raise PluginError(f"{where} failed to load: {type(exc).__name__}: {exc}") from None
    if isinstance(loaded, types.ModuleType):
        return
    if not isinstance(loaded, type):
        raise PluginError(f"{where} names a {type(loaded).__name__}: it must name a module that registers "
                          "its passes or a Pass subclass")
    if not issubclass(loaded, Pass):
        raise PluginError(f"{where} is a class but not a d2compiler Pass")
    try:
        registry.register(loaded)
    except (ValueError, AttributeError) as exc:
        raise PluginError(f"{where}: {exc}") from None


def default_registry() -> PassRegistry:
    """`PASSES` with the shipped passes and the plugins loaded (both found by name at run time, so
    that the core never imports a pass)."""
    importlib.import_module(SHIPPED_PASSES)  # registers the shipped passes on import
    load_plugins()
    return PASSES


def registered_passes() -> dict[str, type[Pass]]:
    """All pass classes of the default registry by name."""
    return default_registry().types()


def pass_types(test: Callable[[type[Pass]], bool]) -> str:
    """`names_where` on the default registry."""
    return default_registry().names_where(test)
