"""--config.KEY=VALUE overrides (ml_collections' config_flags) with one-line
errors: tcr_jax.main parses its flags with `flags_parser`, tcr_jax.bench
applies its overrides with `apply`.

A mistyped key is reported before ml_collections sees it (it raises a bare
AttributeError from deep inside absl's flag parsing), with the closest keys
of the config; a value that does not parse is reported from the error absl
raises. Both are UserErrors: one line on stderr and exit code 2.
"""
from __future__ import annotations

import difflib
import re
import sys
import textwrap
from typing import Callable, Sequence

from absl import flags
from ml_collections import config_dict, config_flags
from ml_collections.config_flags import config_flags as ml_config_flags
from ml_collections.config_flags import config_path

from tcr_jax import configs_lib
from tcr_jax.errors import UserError


def override_keys(argv: Sequence[str], name: str = "config") -> list[str]:
  """The dotted keys of the --NAME.KEY[=VALUE] (and --noNAME.KEY) in argv."""
  pattern = re.compile(rf"-{{1,2}}(?:no)?{re.escape(name)}\.([^=]*)")
  return [m.group(1) for m in map(pattern.match, argv) if m]


def field_paths(config: config_dict.ConfigDict, prefix: str = "") -> list[str]:
  """Every field of the config as a dotted path, the inner nodes too."""
  paths = []
  for key, value in config.items():
    paths.append(prefix + key)
    if isinstance(value, (config_dict.ConfigDict, config_dict.FrozenConfigDict)):
      paths += field_paths(value, f"{prefix}{key}.")
  return paths


def check_keys(config: config_dict.ConfigDict, keys: Sequence[str]) -> None:
  """Raises UserError naming the first key that is no field of the config."""
  for key in keys:
    try:
      config_path.get_type(key, config)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
      closest = difflib.get_close_matches(key, field_paths(config), n=3, cutoff=0)
      raise UserError(f"config has no field {key!r} (closest: "
                      f"{', '.join(closest)})") from None


def _flag_error(error: flags.Error, name: str) -> UserError | None:
  """A UserError for absl's error about an override, else None."""
  text = " ".join(str(error).split())
  match = re.match(rf"flag --{re.escape(name)}\.([^=]*)=(.*?): (.*)", text)
  if match:
    key, value, why = match.groups()
    return UserError(f"bad value {value!r} for config field {key!r}: {why}")
  if isinstance(error, (ml_config_flags.FlagOrderError,
                        ml_config_flags.UnsupportedOperationError)):
    return UserError(text)
  return None


def apply(config: config_dict.ConfigDict, args: Sequence[str],
          name: str = "config") -> config_dict.ConfigDict:
  """The config with the --NAME.KEY=VALUE flags of args applied the way
  --NAME would apply them (the config is changed in place and locked).
  Raises UserError for an unknown key, a bad value or another argument."""
  if not args:
    return config
  argv = ["", *args]
  check_keys(config, override_keys(argv, name))
  flag_values = flags.FlagValues()
  try:
    config_flags.DEFINE_config_dict(name, config, flag_values=flag_values,
                                    lock_config=True, sys_argv=argv)
    rest = flag_values(argv)
  except flags.Error as e:
    raise (_flag_error(e, name)
           or UserError(" ".join(str(e).split()))) from None
  if rest[1:]:
    raise UserError(f"unrecognized arguments: {' '.join(rest[1:])}")
  return flag_values[name].value


def _config_spec(argv: Sequence[str], name: str) -> str | None:
  """The value of --NAME in argv, as ml_collections finds it."""
  for i, arg in enumerate(argv):
    match = re.match(rf"-{{1,2}}{re.escape(name)}(=|$)", arg)
    if match:
      if match.group(1):
        return arg.split("=", 1)[1]
      return argv[i + 1] if i + 1 < len(argv) else None
  return None


def check_argv(argv: Sequence[str], name: str = "config") -> None:
  """Raises UserError if an override key in argv is no field of the config
  --NAME names; when the config does not load, leaves it to flag parsing."""
  try:
    argv = flags.FLAGS.read_flags_from_files(argv, force_gnu=False)
  except flags.Error:
    return
  keys = override_keys(argv, name)
  spec = _config_spec(argv, name)
  if spec is not None:
    import os
    path = spec.partition(":")[0]
    if not os.path.isfile(path):
      raise UserError(f"config file {path!r} not found")
  if not keys or spec is None:
    return
  try:
    config = configs_lib.load_config(spec)
  except Exception:  # pylint: disable=broad-except
    return  # flag parsing reports it
  check_keys(config, keys)


def flags_parser(prog: str, name: str = "config"
                 ) -> Callable[[list[str]], list[str]]:
  """absl.app.run's flags_parser for a program with a config flag --NAME:
  a bad override is one line on stderr, "PROG: error: ...", and exit code 2;
  other flag errors are reported as absl.app reports them."""
  def parse(argv: list[str]) -> list[str]:
    try:
      check_argv(argv, name)
      try:
        return flags.FLAGS(argv)
      except flags.Error as e:
        error = _flag_error(e, name)
        if error is None:  # not about an override: as absl.app reports it
          message = str(e)
          message = (f"\n{textwrap.indent(message, '  ')}\n" if "\n" in message
                     else f" {message}\n")
          sys.stderr.write(f"FATAL Flags parsing error:{message}Pass "
                           "--helpshort or --helpfull to see help on flags.\n")
          sys.exit(1)
        raise error from None
    except UserError as e:
      print(f"{prog}: error: {e}", file=sys.stderr)
      sys.exit(2)
  return parse
