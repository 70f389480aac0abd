"""The compression core: quantization, transforms and entropy models.

  ops             ste_round, quantize, padding, 2x resampling
  layers          torch-compatible convs, sub-pixel transposed conv
  transforms      g_a, g_s (ELIC residual bottleneck), h_a, h_s
  entropy         likelihood and rate math as plain functions
  entropy_models  FactorizedPrior, GaussianEntropyModel and the named
                  combinations (hyperprior, context, checkerboard,
                  conditional)
  tables          range-coding tables identical on every machine
  symbols         symbol coding with constriction
  latent_coding   a latent to streams and back, exactly
  bitstream       the .tcr container
  files           image files of a model's layers (compress, decompress)
"""
from tcr_jax.codec.entropy import bits, bpp, gaussian_likelihood
from tcr_jax.codec.entropy_models import (BASE_KINDS, FactorizedPrior,
                                          GaussianEntropyModel,
                                          make_conditional_model,
                                          make_entropy_model)
from tcr_jax.codec.ops import quantize, ste_round
from tcr_jax.codec.transforms import (AnalysisTransform, HyperAnalysis,
                                      HyperSynthesis, SynthesisTransform)
