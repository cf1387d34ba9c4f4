"""Project errors: a user's mistake, said in one sentence, printed by the CLI without a stack trace."""

from __future__ import annotations


class PlumError(Exception):
    """A problem the user can fix; the message says what to do. Exit code 2 unless overridden."""

    exit_code = 2


class ConfigError(PlumError):
    """The configuration file, an environment override or a command-line value is invalid."""


class AssetError(PlumError):
    """A pinned asset could not be fetched or failed its checksum."""

    exit_code = 3


class StackError(PlumError):
    """The embedded stack (broker, Feast repo) could not be started, reached or stopped."""

    exit_code = 4
