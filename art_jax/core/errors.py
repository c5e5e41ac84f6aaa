"""Errors that are the user's to fix: the CLI prints their message alone, no traceback."""


class UserError(ValueError):
    """Bad input, config or checkpoint; the message names the file, line or key."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used as asked."""

