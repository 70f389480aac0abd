"""The paper's models, assembled from the codec core and the task heads.

  ImageCodec   plain learned image codec: g_a, an entropy model, g_s
  DepthBase    the base layer: Y_b for depth (LRASPP MobileNetV3-L), plus the
               reconstruction decoder whose error is the paper's reward
  Enhancement  the enhancement layer: Y_e coded given Y_b, for
               reconstruction or segmentation (DeepLabV3-ResNet-50)
  DetectionBase  (tcr_jax/model/models_detection.py) the detection base layer:
               Y_b for Faster R-CNN, plus the reconstruction decoder

Each base task (tcr_jax/bases/) builds its layers from a config.

Every model offers the same methods, which the trainer, the evaluation and
the coder (tcr_jax.codec.files) all call instead of re-implementing them:

  analysis(x)             image -> unquantized latent y (float32), padding
                          the image to the model's multiple
  encode(x)               -> (y_hat, likelihoods): analysis + entropy model
  outputs(y_hat, size)    decoded latent -> the layer's outputs at `size`
  entropy_model()         the entropy model as an unbound module (nowrap:
                          callable on the unbound model), and
  entropy_variables(v)    its variables, for the range coder
  latent_shape(h, w)      shape of y for one h x w image

docs/design.md describes the architecture and the two objectives
(tcr_jax/model/objectives.py).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from tcr_jax.codec import entropy_models, layers, ops, transforms
from tcr_jax.model import canvas
from tcr_jax.tasks.deeplabv3 import DeepLabV3ResNet50
from tcr_jax.tasks.layers import resize_bilinear
from tcr_jax.tasks.lraspp import LRASPPMobileNetV3

PyTree = Any


def _dtype(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def _ceil_div(a: int, b: int) -> int:
  return -(-a // b)


def entropy_variables(variables: PyTree) -> PyTree:
  """The entropy model's variables inside a model's ({"params": ...["em"]})."""
  return {"params": variables["params"]["em"]}


def gate_gradient(x: jax.Array, gate: jax.Array | float) -> jax.Array:
  """x in value; its gradient is scaled by `gate` (0: stop_gradient).

  Lets baseline (gate 0) and proposal (gate 1) share one compiled step.
  """
  return jax.lax.stop_gradient(x) + gate * (x - jax.lax.stop_gradient(x))


class ImageCodec(nn.Module):
  """x in [0, 1], (B, H, W, 3) -> reconstruction, likelihoods.

  Sides that are not multiples of 16 are edge-padded before g_a and the
  reconstruction is cropped back to (H, W); the rate counts the padded
  latent, and bpp divides by the original H * W.
  """
  latent_channels: int = 192
  widths: Sequence[int] = (24, 48, 192)
  blocks: int = 3
  entropy_model_name: str = "hyperprior"
  hyper_channels: int = 128
  quantizer: str = "ste"

  entropy_variables = staticmethod(entropy_variables)

  @property
  def multiple(self) -> int:
    return transforms.downsampling(self.widths)

  @nn.nowrap
  def entropy_model(self) -> entropy_models.GaussianEntropyModel:
    return entropy_models.make_entropy_model(
        self.entropy_model_name, self.latent_channels, self.quantizer,
        self.hyper_channels)

  def setup(self):
    self.g_a = transforms.AnalysisTransform(self.latent_channels, self.widths,
                                            self.blocks)
    self.g_s = transforms.SynthesisTransform(3, tuple(reversed(self.widths)),
                                             self.blocks)
    self.em = self.entropy_model()

  def latent_shape(self, height: int, width: int) -> tuple[int, int, int, int]:
    return (1, _ceil_div(height, self.multiple), _ceil_div(width, self.multiple),
            self.latent_channels)

  def analysis(self, x: jax.Array) -> jax.Array:
    return self.g_a(ops.pad_to_multiple(x, self.multiple)[0])

  def encode(self, x: jax.Array, train: bool = False):
    return self.em(self.analysis(x), train=train)

  def outputs(self, y_hat: jax.Array, size: tuple[int, int]) -> dict[str, jax.Array]:
    return {"x_hat": ops.crop(self.g_s(y_hat), size)}

  def __call__(self, x: jax.Array, train: bool = False
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    y_hat, likelihoods = self.encode(x, train)
    return self.outputs(y_hat, x.shape[1:3])["x_hat"], likelihoods


class DepthBase(nn.Module):
  """The depth base layer (docs/design.md).

  x (B, H, W, 3) in [0, 1] -> bilinear x1/2 and a learned 5x5 conv -> g_a ->
  entropy model -> y_hat, then
    - the task path: g_s (task_blocks) -> LRASPP MobileNetV3-L (1 output)
      -> x2 nearest -> 5x5 conv -> disparity in pixels (x disparity_scale);
    - the reconstruction decoder: g_s (recon_blocks) -> x2 nearest -> 5x5
      conv -> x_rec at full resolution, fed with gate_gradient(y_hat, gate):
      gate 1 (proposal) lets the reward shape the latent, gate 0 (baseline)
      only trains the decoder on what the latent already holds.
  Sides that are not multiples of 32 are edge-padded and the outputs cropped
  back.
  """
  latent_channels: int = 192
  widths: Sequence[int] = (24, 48, 192)
  analysis_blocks: int = 3
  task_blocks: int = 1
  recon_blocks: int = 3
  entropy_model_name: str = "hyperprior"
  hyper_channels: int = 128
  quantizer: str = "ste"
  likelihood_bound: str = "clamp"
  disparity_scale: float = 128.0
  depth_bn_momentum: float = 0.01  # torch convention, as torchvision's
  compute_dtype: str = "float32"

  # Files written before the field took the config's name (codec/files.py).
  fingerprint_names = {"depth_bn_momentum": "head_bn_momentum"}

  entropy_variables = staticmethod(entropy_variables)

  @property
  def multiple(self) -> int:
    """The x1/2 resampling, then g_a's strides (32 with three widths)."""
    return 2 * transforms.downsampling(self.widths)

  @nn.nowrap
  def entropy_model(self) -> entropy_models.GaussianEntropyModel:
    return entropy_models.make_entropy_model(
        self.entropy_model_name, self.latent_channels, self.quantizer,
        self.hyper_channels, self.likelihood_bound)

  def setup(self):
    dt = _dtype(self.compute_dtype)
    widths = tuple(self.widths)
    self.down = layers.conv(3, 5)
    self.g_a = transforms.AnalysisTransform(self.latent_channels, widths,
                                            self.analysis_blocks, dtype=dt)
    self.em = self.entropy_model()
    self.g_s_task = transforms.SynthesisTransform(3, widths[::-1],
                                                  self.task_blocks, dtype=dt)
    self.head = LRASPPMobileNetV3(
        num_classes=1, backbone_bn_momentum=1.0 - self.depth_bn_momentum)
    self.up_depth = layers.conv(1, 5)
    self.g_s_rec = transforms.SynthesisTransform(3, widths[::-1],
                                                 self.recon_blocks, dtype=dt)
    self.up_rec = layers.conv(3, 5)

  def latent_shape(self, height: int, width: int) -> tuple[int, int, int, int]:
    return (1, _ceil_div(height, self.multiple), _ceil_div(width, self.multiple),
            self.latent_channels)

  def analysis(self, x: jax.Array) -> jax.Array:
    """x (B, H, W, 3) -> y (float32), x edge-padded to a multiple of 32."""
    padded, _ = ops.pad_to_multiple(x, self.multiple)
    y = self.g_a(self.down(ops.downsample_2x(padded)))
    return y.astype(jnp.float32)

  def encode(self, x: jax.Array, train: bool = False
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """x -> (y_hat, likelihoods): Y_b, the one way every caller gets it."""
    return self.em(self.analysis(x), train=train)

  def task(self, y_hat: jax.Array, train: bool = False) -> jax.Array:
    """y_hat -> disparity in pixels at the padded full resolution, (B, H, W)."""
    t = self.g_s_task(y_hat).astype(jnp.float32)
    d = self.head(t, train=train)["out"]
    d = self.up_depth(ops.upsample_nearest_2x(d))
    return self.disparity_scale * d[..., 0]

  def reconstruct(self, y_hat: jax.Array) -> jax.Array:
    r = self.g_s_rec(y_hat).astype(jnp.float32)
    return self.up_rec(ops.upsample_nearest_2x(r))

  def outputs(self, y_hat: jax.Array, size: tuple[int, int],
              train: bool = False, rec_gate: jax.Array | float = 1.0
              ) -> dict[str, jax.Array]:
    """Disparity (B, H, W) and reconstruction (B, H, W, 3) at `size`."""
    disparity = self.task(y_hat, train)[:, :size[0], :size[1]]
    x_rec = ops.crop(self.reconstruct(gate_gradient(y_hat, rec_gate)), size)
    return {"disparity": disparity, "x_rec": x_rec}

  def __call__(self, x: jax.Array, train: bool = False,
               rec_gate: jax.Array | float = 1.0) -> dict[str, jax.Array]:
    y_hat, likelihoods = self.encode(x, train)
    out = self.outputs(y_hat, x.shape[1:3], train, rec_gate)
    return {"y_hat": y_hat, "likelihoods": likelihoods, **out}


class Enhancement(nn.Module):
  """The enhancement layer: a second latent coded given the base latent.

  x (B, H, W, 3) in [0, 1] -> the half-resolution image (ops.downsample_2x,
  what the layer reconstructs, as in the authors' code) -> the layer's own
  g_a (so Y_e has Y_b's spatial size) -> the conditional entropy model (side
  branch on Y_b plus a causal context), then
    - reconstruction: g_s (recon_blocks) -> x_hat, the half-resolution image;
    - segmentation: g_s (task_blocks) -> DeepLabV3-R50 (+ aux) -> logits,
      bilinearly resized to (H, W).
  side=None gives the standalone enhancement (side information zeroed).

  half_resolution=False (the detection experiment, as the authors): the
  layer codes and reconstructs the image at its own (detection) resolution,
  padded to a multiple of 32 so that Y_e has Y_b's size; normalize_input
  codes the detector's input instead of the pixels (models_detection.
  normalize_canvas: ImageNet-normalised, zero outside image_sizes) and
  returns its reconstruction de-normalised, in pixel space.
  """
  task_name: str = "reconstruction"
  latent_channels: int = 192
  side_channels: int = 192
  widths: Sequence[int] = (24, 48, 192)
  analysis_blocks: int = 3
  task_blocks: int = 1
  recon_blocks: int = 3
  context: str = "serial"
  quantizer: str = "ste"
  likelihood_bound: str = "clamp"
  num_classes: int = 20
  ignore_index: int = 19
  compute_dtype: str = "float32"
  half_resolution: bool = True
  normalize_input: bool = False
  head_width: float = 1.0  # the segmentation head's width multiplier

  entropy_variables = staticmethod(entropy_variables)
  # Depth workdirs' enhancement files predate these fields.
  fingerprint_omits_defaults = ("half_resolution", "normalize_input", "head_width")

  @property
  def multiple(self) -> int:
    """Of the coded image: g_a's strides (16 with three widths) on the
    half-resolution image, or twice that on the input itself, so that Y_e
    has Y_b's size."""
    strides = transforms.downsampling(self.widths)
    return strides if self.half_resolution else 2 * strides

  @nn.nowrap
  def entropy_model(self) -> entropy_models.GaussianEntropyModel:
    return entropy_models.make_conditional_model(
        self.latent_channels, self.side_channels, self.context, self.quantizer,
        self.likelihood_bound)

  def setup(self):
    dt = _dtype(self.compute_dtype)
    widths = tuple(self.widths)
    if self.task_name not in ("reconstruction", "segmentation"):
      raise ValueError(f"unknown enhancement task {self.task_name!r}")
    self.g_a = transforms.AnalysisTransform(self.latent_channels, widths,
                                            self.analysis_blocks, dtype=dt)
    self.em = self.entropy_model()
    blocks = (self.recon_blocks if self.task_name == "reconstruction"
              else self.task_blocks)
    self.g_s = transforms.SynthesisTransform(3, widths[::-1], blocks, dtype=dt)
    if self.task_name == "segmentation":
      self.head = DeepLabV3ResNet50(num_classes=self.num_classes,
                                    width=self.head_width)

  def target(self, x: jax.Array) -> jax.Array:
    """The image the reconstruction enhancement reproduces."""
    return ops.downsample_2x(x) if self.half_resolution else x

  def latent_shape(self, height: int, width: int) -> tuple[int, int, int, int]:
    if self.half_resolution:
      height, width = _ceil_div(height, 2), _ceil_div(width, 2)
    m = self.multiple
    per = m // transforms.downsampling(self.widths)
    return (1, _ceil_div(height, m) * per, _ceil_div(width, m) * per,
            self.latent_channels)

  def analysis(self, x: jax.Array, image_sizes: jax.Array | None = None
               ) -> jax.Array:
    if self.normalize_input:
      padded, _ = canvas.normalize_canvas(self.target(x), image_sizes, self.multiple)
    else:
      padded, _ = ops.pad_to_multiple(self.target(x), self.multiple)
    return self.g_a(padded).astype(jnp.float32)

  def encode(self, x: jax.Array, side: jax.Array | None, train: bool = False,
             image_sizes: jax.Array | None = None):
    return self.em(self.analysis(x, image_sizes), side, train=train)

  def outputs(self, y_hat: jax.Array, size: tuple[int, int],
              train: bool = False) -> dict[str, Any]:
    """{"x_hat"} at half of `size` (at `size` without half_resolution), or
    {"logits": {"out", "aux"}} at `size`."""
    half = ((_ceil_div(size[0], 2), _ceil_div(size[1], 2))
            if self.half_resolution else tuple(size))
    out = ops.crop(self.g_s(y_hat).astype(jnp.float32), half)
    if self.normalize_input:
      out = canvas.denormalize(out)
    if self.task_name == "reconstruction":
      return {"x_hat": out}
    logits = self.head(out, train=train)
    return {"logits": {k: resize_bilinear(v, size) for k, v in logits.items()}}

  def __call__(self, x: jax.Array, side: jax.Array | None,
               train: bool = False, image_sizes: jax.Array | None = None
               ) -> dict[str, Any]:
    y_hat, likelihoods = self.encode(x, side, train, image_sizes)
    out = self.outputs(y_hat, x.shape[1:3], train)
    if self.task_name == "reconstruction":
      out["target"] = self.target(x)
    return {"y_hat": y_hat, "likelihoods": likelihoods, **out}


# --------------------------------------------------------------------------
# The layers of an experiment config.


def enhancement_model(config, **options) -> Enhancement:
  """The enhancement layer of an experiment config; `options` are the base
  task's fields (its enhancement_options(), tcr_jax/bases/)."""
  m = config.model
  return Enhancement(
      task_name=config.task.enhancement, latent_channels=m.latent_channels,
      side_channels=m.latent_channels, widths=tuple(m.widths),
      analysis_blocks=m.analysis_blocks, task_blocks=m.task_blocks,
      recon_blocks=m.recon_blocks, context=config.enhancement_context,
      quantizer=m.quantizer, likelihood_bound=m.likelihood_bound,
      num_classes=config.task.num_classes,
      ignore_index=config.task.ignore_index, compute_dtype=m.compute_dtype,
      head_width=config.task.get("segmentation_width", 1.0), **options)
