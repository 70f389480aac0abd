"""Compute paths must not import TensorFlow (it cannot travel to every GPU box)."""
import subprocess
import sys

import pytest

COMPUTE_MODULES = ["tcr_jax.codec", "tcr_jax.codec.files", "tcr_jax.model.models",
                   "tcr_jax.model.objectives", "tcr_jax.tasks", "tcr_jax.training.train",
                   "tcr_jax.model.evaluate", "tcr_jax.checkpoints", "tcr_jax.training.sweep",
                   "tcr_jax.bench", "tcr_jax.data", "tcr_jax.data.loader",
                   "tcr_jax.data.synthetic", "tcr_jax.cli", "tcr_jax.bases", "tcr_jax.bases.depth",
                   "tcr_jax.bases.detection", "tcr_jax.tools.compression"]


@pytest.mark.parametrize("module", COMPUTE_MODULES)
def test_compute_modules_do_not_import_tensorflow(module):
  code = (f"import sys, {module}\n"
          "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
          "('tensorflow', 'tensorflow_datasets', 'torch'))\n"
          "assert not bad, bad\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
