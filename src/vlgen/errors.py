"""Errors that mean the user's configuration is wrong: the CLI prints them as one line and exits."""


class ConfigError(ValueError):
    """A bad option value or a path that does not exist; the message names the option."""


class RunStopped(RuntimeError):
    """A run that cannot go on usefully: a non-finite loss or gradient, or a split whose samples were all
    unreadable. The message is one line naming the split (and, for training, the step and the samples)."""


def load_failure(err: BaseException) -> str:
    """The first line of a loader's error (``from_pretrained`` messages run to many lines), or its type's name."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
