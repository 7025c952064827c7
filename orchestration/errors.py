"""The run errors a user can fix, each ending `jlstm` with one line and an exit code (2
config, 3 tracking, 5 run in use). Kept apart (no imports) so the command line maps them
without importing Ray, torch or MLflow."""


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says which key and why."""


class TrackingUnavailable(RuntimeError):
    """The configured MLflow tracking server cannot be reached."""


class RunInUse(RuntimeError):
    """Another process is training this run name right now."""
