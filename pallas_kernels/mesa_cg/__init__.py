"""Pallas kernels for the Mesa CG solve; reached through `mesa_chunked(..., impl="pallas")`."""
from pallas_kernels.mesa_cg.params import unsupported_reason
from pallas_kernels.mesa_cg.solve import chunked_cg_solve

__all__ = ["chunked_cg_solve", "unsupported_reason"]
