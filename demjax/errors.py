"""Errors raised for bad user input.

Every message names the config field or flag and the accepted values, so that
``scripts/run.py`` can print it as one line and exit with status 2.
"""


class ConfigError(ValueError):
    """Bad configuration or input: the message names the field and what is accepted."""


class DivergenceError(ConfigError):
    """The training diverged so far that the run cannot go on (e.g. agents'
    models are non-finite at a re-grouping); the message names the cause and
    the config fields that control it (``lr``, ``amplify_factor``, ...)."""


class DataNotFoundError(ConfigError):
    """A data set is not available offline; the message says how to get it."""


def check_choice(field: str, value, choices) -> None:
    """Raise ``ConfigError`` unless ``value`` is one of ``choices``.

    Raises:
      ConfigError: ``"<field>=<value!r> is not valid; accepted: a, b, c"``.
    """
    if value not in choices:
        accepted = ", ".join(str(c) for c in choices)
        raise ConfigError(f"{field}={value!r} is not valid; accepted: {accepted}")


def check_arg(name: str, value, choices) -> None:
    """Argument check of a public function called with raw values (a run's
    config fields are checked once, by ``demjax.config.validate``).

    Raises:
      ValueError: ``"<name>=<value!r> is not valid; accepted: a, b, c"``, naming
        the argument (not a ``ConfigError``: the argument is not a config field).
    """
    if value not in choices:
        accepted = ", ".join(str(c) for c in choices)
        raise ValueError(f"{name}={value!r} is not valid; accepted: {accepted}")


class DataFileError(ConfigError):
    """A data file is unreadable, corrupt or malformed; the message names the file."""
