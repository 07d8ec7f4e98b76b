"""MesaNet in JAX."""
