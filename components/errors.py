"""Errors about the user's input: the CLI prints them as one line, without a traceback."""


class TaskatlasError(Exception):
    """Bad input (a file, a field, a request); the message names what is wrong."""


class ConfigError(TaskatlasError, ValueError):
    """A config field has a bad value; the message names the field."""
