"""The data errors a user can fix, each ending `jlstm` with one line and exit 4. Kept apart
(no imports) so the command line maps them without importing pyarrow, Ray or torch."""


class BadDataError(RuntimeError):
    """More of the dataset failed than `max_bad_fraction` allows, or a node lacks the data."""


class StaleCacheError(RuntimeError):
    """The cache on disk was built for different data, backbone or clip settings."""
