"""Exceptions shared across tcr_jax."""


class UserError(Exception):
  """Bad input from the user (file, flag, checkpoint): reported as one line."""
