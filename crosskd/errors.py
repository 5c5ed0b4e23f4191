"""User-facing errors: one line that names the problem and the fix; the CLI prints them and exits 2."""


class UserError(Exception):
    """A problem with what the user asked for (not a bug): printed as one line, exit code 2."""


class ConfigError(UserError):
    """Unknown key, wrong value type, bad model YAML."""


class DataError(UserError):
    """Missing dataset, unreadable image list, bad dataset YAML."""


class CheckpointError(UserError):
    """Missing, corrupt or incompatible checkpoint; mismatched teacher and student."""
