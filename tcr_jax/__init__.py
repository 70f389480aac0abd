"""tcr_jax: task-compatible compressible representations in JAX/Flax.

Subpackages:
  codec/  quantization, transforms (g_a, g_s, h_a, h_s), entropy models
  data/   the embedded synthetic street-scene dataset
  tasks/  Flax ports of the torchvision task heads, with their losses
"""

__version__ = "0.1.0"
