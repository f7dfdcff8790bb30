"""The errors a user can fix, under one base class, so the entry points catch one type.

Every class here means "the input is wrong", never "minillm has a bug": the entry points print the
message as one line (``error: <message>``) and exit with status 2; any other exception keeps its
traceback. Messages name the input (a config key, a file, a checkpoint), say what is wrong, and
say what to do.
"""
from __future__ import annotations


class UserError(Exception):
    """Base class: a mistake in the configuration, the data or the run folder, fixable by the user."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work. The message names the key, the value and what to do."""


class DataError(UserError, ValueError):
    """The corpus cannot be found, fetched or read; the message says which and what to do."""


class TokenizerError(UserError, ValueError):
    """Training or loading a tokenizer failed because of its input; the message says which."""


class TokenFileError(UserError, ValueError):
    """A token file that cannot be used; the message names the file and what is wrong."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used; the message names it and says what to do."""


class RunError(UserError, RuntimeError):
    """The run cannot start as configured (existing run folder, incompatible checkpoint, ...)."""
