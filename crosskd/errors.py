"""User-facing errors: one line that names the problem and the fix; the CLI prints them and exits 2."""


class UserError(Exception):
    """A problem with what the user asked for (not a bug): printed as one line, exit code 2."""


class ConfigError(UserError):
    """Unknown key, wrong value type, bad model YAML."""


class DataError(UserError):
    """Missing dataset, unreadable image list, bad dataset YAML."""


class CheckpointError(UserError):
    """Missing, corrupt or incompatible checkpoint; mismatched teacher and student."""


class RunStopped(Exception):  # noqa: N818 - a stop on request, not an error
    """A run stopped on request (e.g. SIGTERM) after saving what resumes it.

    The message (empty on ranks other than 0) names the reason and the resume command; the CLI prints it and exits
    with `exit_code`, 128 + the signal number (143 for SIGTERM, 130 for SIGINT).
    """

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class TrainingError(UserError):
    """Training cannot go on: too many non-finite losses in a row."""
