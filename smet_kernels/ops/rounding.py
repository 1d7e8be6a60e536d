"""Rounding of the kernels' fp32 results to their storage dtype.

On a GPU ``x.to(tl.bfloat16)`` rounds to nearest even, as ``torch.Tensor.to`` does. Triton's CPU interpreter
(3.9) truncates fp32 → bf16 instead, whatever ``fp_downcast_rounding`` says, so a bf16 weight updated by the
interpreted AdamW kernel would drift towards zero by up to one unit in the last place per step. Under the
interpreter :func:`downcast` therefore rounds the fp32 bit pattern to nearest even first — the cast that follows is
then exact. Compiled kernels are unchanged.
"""

import triton
import triton.language as tl

from ..backend import INTERPRET

EMULATE_BF16_ROUNDING = tl.constexpr(INTERPRET)


@triton.jit
def downcast(x, DTYPE: tl.constexpr):
    """``x`` (fp32) as ``DTYPE``, rounded to nearest even (ties to even; NaN and ±inf kept)."""
    if EMULATE_BF16_ROUNDING and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x.to(DTYPE)
