"""Errors a user can cause and fix, apart from the bugs that can't be.

Entry points print a `UserError` as one line (its message says what to do)
and exit non-zero; any other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
  """A mistake the user can fix; the message says how, in one sentence."""


class ConfigError(UserError):
  """A config value, flag or path that cannot work."""


class DivergedError(UserError):
  """Training produced non-finite values; the last checkpoint is finite."""
