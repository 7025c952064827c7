"""The data and cluster errors a user can fix, each ending `jlstm` with one line and an exit
code (4; a cluster that cannot be joined 6). Kept apart (no imports) so the command line
maps them without importing pyarrow, Ray or torch."""


class BadDataError(RuntimeError):
    """More of the dataset failed than `max_bad_fraction` allows, or a node lacks the data."""


class StaleCacheError(RuntimeError):
    """The cache on disk was built for different data, backbone or clip settings."""


class ClusterUnavailable(RuntimeError):
    """The Ray cluster to join cannot be joined as it is (exit 6)."""
