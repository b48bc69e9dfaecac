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


class Terminated(KeyboardInterrupt):
    """The process got SIGTERM (a scheduler, `kill`, a job stopped): it ends as an interrupt does,
    keeping every finished step, and the CLI says so in one line (`terminate_as_interrupt`)."""

    exit_code = 143  # 128 + SIGTERM, as a shell reports a process killed by it


def terminate_as_interrupt() -> None:
    """SIGTERM raises `Terminated` in the main thread, between two Python steps. The default
    ends the process where it stands; Ray's driver handler calls `sys.exit` (a traceback, and a
    crash at exit with HiGHS's or Ray's threads still running). Call again after `ray.init`,
    which installs Ray's."""
    import signal

    def raise_terminated(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, raise_terminated)
