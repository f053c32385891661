"""The shipped passes. Importing this package registers each pass under its recipe `type`."""

from . import (  # noqa: F401
    admm,
    attention_kl_update,
    calibrate,
    dense_target,
    dual_taylor_mask,
    gptq,
    magnitude,
    pack_2_4,
    quantize_rtn,
    sparsegpt,
    sparsity_allocation,
    wanda,
)
