"""The `tcr-jax` command line.

Each sub-command imports what it needs lazily so that `tcr-jax --help` is
fast and sub-commands that never touch TensorFlow do not import it.
"""
from __future__ import annotations

import argparse
import os
import sys

from tcr_jax.errors import UserError


def _preview_data(args: argparse.Namespace) -> None:
  from tcr_jax.data import preview  # lazy: see the docstring
  preview.write_contact_sheet(args.output, split=args.split, num=args.num,
                              height=args.height, width=args.width,
                              seed=args.seed)
  print(args.output)


def _import_torchvision(args: argparse.Namespace) -> None:
  from tcr_jax.tasks import checkpoint_io  # lazy: see the docstring
  summary = checkpoint_io.import_to_checkpoint(
      args.arch, args.state_dict, args.output)
  import json
  print(json.dumps(summary))


def _compress(args: argparse.Namespace) -> None:
  from tcr_jax.tools import compression  # lazy: see the docstring
  import json
  print(json.dumps(compression.compress_file(
      args.workdir, args.input, args.output, args.checkpoint)))


def _decompress(args: argparse.Namespace) -> None:
  from tcr_jax.tools import compression  # lazy: see the docstring
  import json
  print(json.dumps(compression.decompress_file(
      args.workdir, args.input, args.output_dir, args.layers, args.checkpoint)))


def _prepare_data(args: argparse.Namespace) -> None:
  import json
  from tcr_jax.data.prepare import prepare_data  # lazy: see the docstring
  print(json.dumps(prepare_data(args.dataset, args.manual_dir, args.data_dir)))


def _compare_seeds(args: argparse.Namespace) -> None:
  from tcr_jax.reporting import seeds  # lazy: see the docstring
  text = seeds.report(args.workdirs)
  if args.output:
    with open(args.output, "w") as f:
      f.write(text)
  print(text, end="")


def _probe(args: argparse.Namespace) -> None:
  from tcr_jax.tools import probe  # lazy: see the docstring
  split = lambda s: tuple(x for x in s.split(",") if x)
  probe.probe_workdir(args.workdir, families=split(args.families),
                      targets=split(args.targets), steps=args.steps,
                      train_images=args.train_images, val_images=args.val_images,
                      seed=args.seed, budget_check=args.budget_check,
                      stages=split(args.stages), learning_rate=args.learning_rate)
  import os
  print(os.path.join(args.workdir, "v_information.md"))


def _ceiling(args: argparse.Namespace) -> None:
  from tcr_jax import checkpoints  # lazy: see the docstring
  from tcr_jax.tools import ceiling  # lazy: see the docstring
  config = checkpoints.workdir_config(args.workdir)
  if args.patience is not None:
    config.train.base_patience = args.patience
  import json
  print(json.dumps(ceiling.train_ceiling(config, args.workdir, args.steps,
                                         args.eval_every)))
  results = os.path.join(args.workdir, "results.json")
  if os.path.exists(results):  # a finished sweep: its report gets the ceiling
    from tcr_jax import checkpoints  # lazy: see the docstring
    from tcr_jax.reporting import poster, rd  # lazy: see the docstring
    records = checkpoints.read_json(results)
    rd.write_report(records, args.workdir, config.experiment,
                    config.task.enhancement_rate_pixels, poster.report_lines(records))
    print(f"{os.path.join(args.workdir, 'bd_rate.md')} and its plots now show "
          "the ceiling", file=sys.stderr)


def _side_information(args: argparse.Namespace) -> None:
  from tcr_jax.tools import side_information  # lazy: see the docstring
  side_information.report(args)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="tcr-jax",
      description="Task-compatible compressible representations in JAX.")
  sub = p.add_subparsers(dest="command", required=True)

  s = sub.add_parser("preview-data",
                     help="contact sheet of the synthetic street scenes")
  s.add_argument("--output", required=True, help="PNG file to write")
  s.add_argument("--split", default="train", choices=["train", "validation", "test"])
  s.add_argument("--num", type=int, default=8)
  s.add_argument("--height", type=int, default=128)
  s.add_argument("--width", type=int, default=256)
  s.add_argument("--seed", type=int, default=0)
  s.set_defaults(func=_preview_data)

  s = sub.add_parser("import-torchvision",
                     help="convert a torchvision state_dict to an orbax checkpoint")
  s.add_argument("--arch", required=True,
                 choices=["lraspp_mobilenet_v3_large", "deeplabv3_resnet50",
                          "mobilenet_v3_large", "resnet50",
                          "fasterrcnn_resnet50_fpn_v2"])
  s.add_argument("--state-dict", required=True, help=".pth file (torch.save)")
  s.add_argument("--output", required=True, help="checkpoint directory")
  s.set_defaults(func=_import_torchvision)

  s = sub.add_parser("prepare-data",
                     help="build the tfds Cityscapes / COCO 2017 datasets")
  s.add_argument("--dataset", required=True, choices=["cityscapes", "coco"])
  s.add_argument("--manual-dir", default=None,
                 help="downloaded archives (Cityscapes: the three trainvaltest "
                      "zips; COCO: train2017.zip, val2017.zip, "
                      "annotations_trainval2017.zip)")
  s.add_argument("--data-dir", required=True,
                 help="tfds data dir; point config.data.data_dir to it")
  s.set_defaults(func=_prepare_data)

  s = sub.add_parser("compare-seeds",
                     help="BD-rates and checks of one sweep under several seeds")
  s.add_argument("workdirs", nargs="+", help="workdirs of finished sweeps")
  s.add_argument("--output", default=None, help="markdown file to write")
  s.set_defaults(func=_compare_seeds)

  s = sub.add_parser("probe", help="V-information of every trained base "
                     "latent (docs/v_information.md)")
  s.add_argument("workdir", help="workdir of a depth sweep")
  s.add_argument("--families", default="linear,conv",
                 help="comma-separated decoder families: linear, conv")
  s.add_argument("--targets", default="image,disparity,labels",
                 help="comma-separated targets: image, disparity, labels")
  s.add_argument("--steps", type=int, default=1000,
                 help="training steps of each probe (batch 8)")
  s.add_argument("--train-images", type=int, default=512)
  s.add_argument("--val-images", type=int, default=128)
  s.add_argument("--seed", type=int, default=0)
  s.add_argument("--learning-rate", type=float, default=None,
                 help="Adam's peak learning rate (default: 3e-3 for the image "
                      "and disparity, 0.1 for the labels)")
  s.add_argument("--stages", default="",
                 help="comma-separated base stages (default: every finished one)")
  s.add_argument("--budget-check", action="store_true",
                 help="also train each probe twice as long and record it")
  s.set_defaults(func=_probe)

  s = sub.add_parser("ceiling", help="the depth head trained on uncompressed "
                     "images: the base task's ceiling, to WORKDIR/ceiling.json")
  s.add_argument("workdir", help="workdir of a depth sweep (its config.json)")
  s.add_argument("--steps", type=int, default=4000)
  s.add_argument("--eval-every", type=int, default=250)
  s.add_argument("--patience", type=int, default=None,
                 help="evaluations without a better RMSE before stopping "
                      "(default: the config's train.base_patience; 0: never)")
  s.set_defaults(func=_ceiling)

  s = sub.add_parser("side-information", help="per channel, how much each "
                     "conditional enhancement's entropy model gains from Y_b")
  s.add_argument("workdir", help="workdir of a finished sweep")
  s.add_argument("--images", type=int, default=64)
  s.add_argument("--batch", type=int, default=32)
  s.add_argument("--channels", action="store_true",
                 help="also print per-channel tables")
  s.set_defaults(func=_side_information)

  s = sub.add_parser("compress", help="image -> .tcr file with a trained workdir")
  s.add_argument("--workdir", required=True, help="training workdir")
  s.add_argument("--input", required=True, help="image file (PNG, JPEG, ...)")
  s.add_argument("--output", required=True, help=".tcr file to write")
  s.add_argument("--checkpoint", default=None,
                 help="stage name, e.g. enhancement_proposal_alpha1 (default: "
                      "the proposal at the middle alpha)")
  s.set_defaults(func=_compress)

  s = sub.add_parser("decompress", help=".tcr file -> PNGs")
  s.add_argument("--workdir", required=True, help="training workdir")
  s.add_argument("--input", required=True, help=".tcr file")
  s.add_argument("--output-dir", required=True)
  s.add_argument("--layers", default="all", choices=["base", "all"])
  s.add_argument("--checkpoint", default=None)
  s.set_defaults(func=_decompress)
  return p


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    args.func(args)
  except (UserError, FileNotFoundError) as e:
    msg = e.args[0] if e.args else repr(e)
    print(f"tcr-jax {args.command}: error: {msg}", file=sys.stderr)
    return 2
  except Exception as e:  # no traceback for users of the file commands
    if args.command not in ("compress", "decompress"):
      raise
    print(f"tcr-jax {args.command}: error: {type(e).__name__}: {e}".splitlines()[0],
          file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
