"""How far an f32 kernel product may sit from XLA's f32 one, on the backend the tests run on.

On CPU (interpret mode) both are true f32 dots: only the summation order differs. On GPU the kernels' "highest" dots
are three fp16 passes on scaled operands (`chunk.SplitDot`, `params.dot_precision`), keeping about 22 of f32's 24
mantissa bits (measured on an H200 at B=2 T=2048 H=4 D=128: output 6.2e-7 of scale from the XLA path,
benchmarks/pallas_check.py); the bound leaves room for products that sum many terms of one sign.
"""
from pallas_kernels.mesa_cg.params import target

F32_PRODUCT_ERROR = 1e-6 if target() == "cpu" else 3e-5
