import jax

# Parity tests compare float32 networks; GPUs multiply float32 matrices in TF32 by default,
# which would show as 1e-3 errors. On the CPU (CI) this changes nothing.
jax.config.update("jax_default_matmul_precision", "highest")
