"""The notebooks in notebooks/: committed without outputs, each with its
Colab badge, and each executing top to bottom (nbclient) on the CPU with
TCR_NOTEBOOK_FAST=1, in a few minutes on two cores. An error in any cell
fails; so does a notebook that stops drawing or printing what it promises."""
import os
import re
import time

import pytest

nbformat = pytest.importorskip("nbformat")

NOTEBOOKS = ("quickstart", "bitstreams", "accelerators")
REPO_URL = "https://github.com/tcr-jax/tcr_jax"


def _read(root, name):
  return nbformat.read(os.path.join(root, "notebooks", f"{name}.ipynb"),
                       as_version=4)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_clean_with_its_badge(root, name):
  nb = _read(root, name)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(not c.outputs and c.execution_count is None for c in code), \
      "commit notebooks with their outputs cleared"
  first = nb.cells[0]
  assert first.cell_type == "markdown"
  assert ("https://colab.research.google.com/github/tcr-jax/tcr_jax/blob/main/"
          f"notebooks/{name}.ipynb") in first.source
  # The repository URL of the install cell, in one place per notebook.
  setup = code[0].source
  assert setup.count(REPO_URL) == 1 and f'REPO_URL = "{REPO_URL}"' in setup
  assert sum(c.source.count(REPO_URL) for c in code) == 1
  assert "TCR_NOTEBOOK_FAST" in setup


def _outputs(nb):
  return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def _stdout(nb):
  return "".join(o.get("text", "") for o in _outputs(nb)
                 if o.output_type == "stream" and o.name == "stdout")


def _figures(nb):
  return sum(1 for o in _outputs(nb) if o.output_type == "display_data"
             and "image/png" in o.get("data", {}))


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name, root, tmp_path, monkeypatch):
  nbclient = pytest.importorskip("nbclient")
  monkeypatch.setenv("TCR_NOTEBOOK_FAST", "1")
  monkeypatch.setenv("TCR_NOTEBOOK_OUT", str(tmp_path / "out"))
  path = os.environ.get("PYTHONPATH")
  monkeypatch.setenv("PYTHONPATH", root + (os.pathsep + path if path else ""))
  # The kernel keeps conftest's four fake CPU devices (and its compilation
  # cache): the :smoke sweeps it runs are the programs tests/test_train.py
  # compiled, loaded instead of compiled again. The notebooks run on any
  # device count: Colab's one CPU or GPU, a TPU's eight.
  nb = _read(root, name)
  start = time.perf_counter()
  nbclient.NotebookClient(
      nb, timeout=600, kernel_name="python3",
      resources={"metadata": {"path": os.path.join(root, "notebooks")}}
  ).execute()  # raises CellExecutionError at the first failing cell
  elapsed = time.perf_counter() - start
  nbformat.write(nb, str(tmp_path / f"{name}.ipynb"))  # to look at
  print(f"{name}.ipynb executed in {elapsed:.0f} s")
  assert not [o for o in _outputs(nb) if o.output_type == "error"]
  text = _stdout(nb)
  assert f"tcr_jax from {os.path.join(root, 'tcr_jax')}" in text
  assert "on cpu" in text and "FAST=True" in text
  CHECKS[name](nb, text)


def _quickstart(nb, text):
  assert _figures(nb) >= 3  # the scenes, the RD curves, the previews
  assert "trained models: 10" in text  # 2 alphas x (2 bases, 3 enhancements)
  assert text.count("proposal - baseline: PSNR read off the base") == 2
  markdown = [o for o in _outputs(nb) if "text/markdown" in o.get("data", {})]
  assert markdown and "| base task: depth RMSE" in markdown[0].data["text/markdown"]
  # The paper's settings differ from the smoke config's in the image size.
  assert re.search(r"^data\.height +64 +1024$", text, re.M)


def _bitstreams(nb, text):
  assert _figures(nb) >= 2  # bits per stream, the decoded pictures
  for stream in ("hyper", "base", "enhancement"):
    bits, estimate = re.search(
        rf"^{stream} +(\d+) bits in the file, +([\d.]+) estimated", text, re.M).groups()
    assert int(bits) > 0 and float(estimate) > 0
  assert "latents decoded with the base model only: ['y_base']" in text
  assert "base latent decoded exactly: True" in text
  assert "enhancement latent decoded exactly: True" in text
  assert "same input, same model: same bytes: True" in text
  assert re.search(r"^tcr-jax decompress: error: .+$", text, re.M)
  assert "error lines: 1" in text and "wrote anything: False" in text
  assert int(re.search(r"exit code: (\d+)", text).group(1)) != 0


def _accelerators(nb, text):
  assert _figures(nb) >= 1
  assert "backend: cpu" in text and "On a GPU or TPU this times" in text
  rate = float(re.search(r"on cpu: ([\d.]+) images/s", text).group(1))
  assert rate > 0
  for kind in ("hyperprior", "checkerboard", "context"):
    assert re.search(rf"{kind}: encode +[\d.]+ ms, decode +[\d.]+ ms", text)


CHECKS = {"quickstart": _quickstart, "bitstreams": _bitstreams,
          "accelerators": _accelerators}
