"""Typed errors. Every user-facing failure is a `D2Error`; the CLI prints its message without a
traceback and exits with status 2."""

from __future__ import annotations


class D2Error(Exception):
    """Base class: a message a user can act on."""


class RecipeError(D2Error):
    """A recipe is malformed. The message names the file, the dotted field path and what was
    expected, one problem per line."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        lines = [f"{source}: {loc or '<root>'}: {msg}" for loc, msg in problems]
        super().__init__("invalid recipe\n" + "\n".join("  " + line for line in lines))


class ModelLoadError(D2Error):
    """A model source could not be resolved or loaded."""


class DataError(D2Error):
    """A data source could not be read, or holds too little text."""


class TraceError(D2Error):
    """A block could not be traced or analysed."""


class PassOrderError(D2Error):
    """The recipe's passes cannot be scheduled: a pass lacks an artifact no earlier pass provides."""


class PassError(D2Error):
    """A pass failed or broke an invariant. The message names the pass, the block and the layer."""


class PreconditionError(PassError):
    """The block does not satisfy what a pass needs before it runs (`Pass.precondition`)."""


class PostconditionError(PassError):
    """A pass left the block breaking one of its postconditions (`Pass.postconditions`)."""


class OutputError(D2Error):
    """The output path cannot be written."""


class PluginError(D2Error):
    """A pass plugin (entry point `d2compiler.passes`) could not be loaded or registered."""


def first_line(exc: BaseException) -> str:
    """The first non-blank line of an exception's message (stripped), else its type's name: what a
    one-line error quotes of a library's exception."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
