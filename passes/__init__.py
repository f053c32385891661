"""The shipped passes. Importing this package registers each pass under its recipe `type`."""

from . import attention_kl_update, calibrate, dual_taylor_mask, magnitude, sparsegpt, wanda  # noqa: F401
