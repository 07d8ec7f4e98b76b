"""How far an f32 kernel product may sit from XLA's f32 one, on the backend the tests run on.

On CPU (interpret mode) both are true f32 dots: only the summation order differs. On GPU the kernels' "highest" dots
are three bf16 passes (`params.dot_precision`: BF16_BF16_F32_X3), whose split operands keep 16 of f32's 24 mantissa
bits: up to 2^-16 ≈ 1.5e-5 relative per product before errors average out (measured on an H200: 7.8e-6 of scale on
a final state, which a CPU-calibrated 1e-6 bound rejected).
"""
from pallas_kernels.mesa_cg.params import target

F32_PRODUCT_ERROR = 1e-6 if target() == "cpu" else 3e-5
