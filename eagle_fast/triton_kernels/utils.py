"""@triton.jit helpers shared by the kernels of several ops."""

import triton
import triton.language as tl


@triton.jit
def cast_out(x, ty: tl.constexpr):
    # fp32 accumulator -> output dtype, round-to-nearest-even like torch's .to(bfloat16). The CPU
    # interpreter's fp32 -> bf16 cast truncates, so the bits are rounded first; the final cast is
    # then exact on every backend.
    if ty == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        x = bits.to(tl.float32, bitcast=True)
    return x.to(ty)


@triton.jit
def dot_acc(a, b, IEEE: tl.constexpr):
    """a @ b with fp32 accumulation: IEEE fp32 for fp32 inputs, else in b's dtype (tensor cores)."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a.to(b.dtype), b)
