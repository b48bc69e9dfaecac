"""Errors the CLI prints as one line, without a traceback: bad input (exit 2), and failures of
the machine a run cannot go on without (a full disk, a lost study lock: exit 1)."""


class TaskatlasError(Exception):
    """Bad input (a file, a field, a request); the message names what is wrong."""

    exit_code = 2


class ConfigError(TaskatlasError, ValueError):
    """A config field has a bad value; the message names the field."""


class OutOfSpace(TaskatlasError):
    """The disk being written is full; `writing` names the file or step (or is "")."""

    exit_code = 1

    def __init__(self, message: str, writing: str = ""):
        super().__init__(message)
        self.writing = writing


class LockLost(TaskatlasError):
    """Another process took this process's study lock over: it must write nothing more."""

    exit_code = 1
