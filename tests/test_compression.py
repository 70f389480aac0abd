"""tcr-jax compress / decompress against a (freshly initialised) workdir."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tcr_jax import checkpoints, cli
from tcr_jax.data.synthetic import SyntheticScenes
from tcr_jax.tools import compression
from tcr_jax.training import train


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, configs):
  """A workdir holding one base and one enhancement stage, as training leaves it."""
  root = tmp_path_factory.mktemp("wd")
  config = configs.smoke()
  exp = train.Experiment(config, str(root), devices=jax.devices()[:1])
  with open(root / "config.json", "w") as f:
    f.write(config.to_json())
  for kind, name in (("base", "base_proposal_alpha0.05"),
                     ("enhancement", "enhancement_proposal_alpha0.05")):
    stage_dir = str(root / "stages" / name)
    state = exp.create_train_state(train.Stage(name, kind, 1, {}))
    with checkpoints.manager(stage_dir, async_save=False) as mngr:
      checkpoints.save(mngr, 1, *state.split(),
                       metrics={"loss": 1.0, "select": 1.0})
    checkpoints.write_json(os.path.join(stage_dir, checkpoints.DONE),
                           {"metrics": {}})
  return str(root)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
  img = SyntheticScenes("validation", 64, 96, seed=3)[0]["image"]
  path = tmp_path_factory.mktemp("img") / "scene.png"
  Image.fromarray(img).save(path)
  return str(path)


def _run(capsys, *argv):
  code = cli.main(list(argv))
  out, err = capsys.readouterr()
  return code, out, err


@pytest.mark.slow
def test_compress_decompress_round_trip(workdir, image_path, tmp_path, capsys):
  out_file = str(tmp_path / "a.tcr")
  code, out, err = _run(capsys, "compress", "--workdir", workdir, "--input",
                        image_path, "--output", out_file)
  assert code == 0, err
  summary = json.loads(out)
  assert summary["bytes"] == os.path.getsize(out_file)
  assert set(summary["bits"]) == set(summary["estimated_bits"]) == {
      "hyper", "base", "enhancement"}
  assert sum(summary["bits"].values()) <= 8 * summary["bytes"]
  # Same input, same bytes.
  again = str(tmp_path / "b.tcr")
  assert _run(capsys, "compress", "--workdir", workdir, "--input", image_path,
              "--output", again)[0] == 0
  assert open(out_file, "rb").read() == open(again, "rb").read()

  for layers in ("all", "base"):
    out_dir = tmp_path / f"dec_{layers}"
    code, out, err = _run(capsys, "decompress", "--workdir", workdir, "--input",
                          out_file, "--output-dir", str(out_dir), "--layers", layers)
    assert code == 0, err
    info = json.loads(out)
    assert info["layers"] == layers
    rec = Image.open(out_dir / "reconstruction.png")
    disp = Image.open(out_dir / "disparity.png")
    assert rec.size == disp.size == (96, 64) and rec.mode == "RGB"
  base_rec = np.asarray(Image.open(tmp_path / "dec_base" / "reconstruction.png"))
  all_rec = np.asarray(Image.open(tmp_path / "dec_all" / "reconstruction.png"))
  assert not np.array_equal(base_rec, all_rec)  # the enhancement was used

  # The decoded pixels are the models' own outputs for the coded latents.
  _, (bm, bv), (em, ev), _ = compression.load_models(workdir)
  x = jnp.asarray(np.asarray(Image.open(image_path))[None], jnp.float32) / 255
  y_b, _ = bm.apply(bv, x, method="encode")
  y_e, _ = em.apply(ev, x, y_b, method="encode")
  base_out = bm.apply(bv, y_b, (64, 96), method="outputs")
  half = np.asarray(em.apply(ev, y_e, (64, 96), method="outputs")["x_hat"])[0]
  to_u8 = lambda a: (np.clip(a, 0, 1) * 255).round().astype(np.uint8)
  want_all = np.asarray(Image.fromarray(to_u8(half)).resize(
      (96, 64), Image.Resampling.BICUBIC))
  disparity = np.asarray(Image.open(tmp_path / "dec_base" / "disparity.png"))
  want_disp = np.clip(np.round(np.asarray(base_out["disparity"])[0] * 256 + 1),
                      1, 65535)
  for got, want in ((base_rec, to_u8(np.asarray(base_out["x_rec"])[0])),
                    (all_rec, want_all), (disparity, want_disp)):
    diff = np.abs(got.astype(np.int64) - want.astype(np.int64))
    assert diff.max() <= 1 and diff.mean() < 0.01  # rounding of float noise


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16"])
def test_other_image_modes_are_converted_with_a_warning(workdir, tmp_path, capsys, mode):
  rgb = SyntheticScenes("validation", 64, 64, seed=1)[1]["image"]
  if mode == "I;16":
    img = Image.fromarray((rgb[..., 0].astype(np.uint16) * 257))
  else:
    img = Image.fromarray(rgb).convert(mode)
  path = tmp_path / f"in_{mode.replace(';', '')}.png"
  img.save(path)
  code, out, err = _run(capsys, "compress", "--workdir", workdir, "--input",
                        str(path), "--output", str(tmp_path / "o.tcr"))
  assert code == 0, err
  assert "converted" in err and "8-bit RGB" in err and len(err.strip().splitlines()) == 1


def _corruptions(data):
  flipped = bytearray(data)
  flipped[len(data) // 2] ^= 0x10
  wrong_magic = b"XXXX" + data[4:]
  rng = np.random.default_rng(0)
  return {"truncated": data[:len(data) // 2], "flipped": bytes(flipped),
          "magic": wrong_magic, "empty": b"",
          "random": rng.integers(0, 256, 300, dtype=np.uint8).tobytes()}


def test_bad_streams_give_one_line_errors_and_write_nothing(workdir, image_path,
                                                            tmp_path, capsys):
  good = str(tmp_path / "good.tcr")
  assert _run(capsys, "compress", "--workdir", workdir, "--input", image_path,
              "--output", good)[0] == 0
  data = open(good, "rb").read()
  for name, bad in _corruptions(data).items():
    path = tmp_path / f"{name}.tcr"
    path.write_bytes(bad)
    out_dir = tmp_path / f"out_{name}"
    code, out, err = _run(capsys, "decompress", "--workdir", workdir, "--input",
                          str(path), "--output-dir", str(out_dir))
    assert code != 0, name
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (name, err)
    assert not out_dir.exists() or not any(out_dir.iterdir()), name


def test_bad_images_give_one_line_errors(workdir, tmp_path, capsys):
  not_image = tmp_path / "notes.png"
  not_image.write_text("hello")
  tiny = tmp_path / "tiny.png"
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tiny)
  for path, words in ((not_image, "not a readable image"),
                      (tiny, "smaller than one latent cell"),
                      (tmp_path / "missing.png", "no such file")):
    out = tmp_path / "x.tcr"
    code, _, err = _run(capsys, "compress", "--workdir", workdir, "--input",
                        str(path), "--output", str(out))
    assert code != 0 and words in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
  code, _, err = _run(capsys, "compress", "--workdir", str(tmp_path), "--input",
                      str(tiny), "--output", str(tmp_path / "y.tcr"))
  assert code != 0 and "not a training workdir" in err


def test_unknown_checkpoint_lists_the_choices(workdir, image_path, tmp_path, capsys):
  code, _, err = _run(capsys, "compress", "--workdir", workdir, "--input",
                      image_path, "--output", str(tmp_path / "z.tcr"),
                      "--checkpoint", "base_proposal_alpha9")
  assert code != 0 and "enhancement_proposal_alpha0.05" in err
