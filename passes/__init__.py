"""The shipped passes. Importing this package registers each pass under its recipe `type`."""

from . import calibrate, magnitude, sparsegpt, wanda  # noqa: F401
