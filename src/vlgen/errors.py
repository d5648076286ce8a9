"""Errors that mean the user's configuration is wrong: the CLI prints them as one line and exits."""


class ConfigError(ValueError):
    """A bad option value or a path that does not exist; the message names the option."""
