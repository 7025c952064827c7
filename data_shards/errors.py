"""The data and cluster errors a user can fix, each ending `jlstm` with one line and an exit
code (4; a split file that cannot be read 2; a cluster that cannot be joined 6). Kept apart
(no imports) so the command line maps them without importing pyarrow, Ray or torch."""


class BadDataError(RuntimeError):
    """More of the dataset failed than `max_bad_fraction` allows, or a node lacks the data."""


class MissingVideosError(BadDataError):
    """Videos of the manifest are not under the run's `data.root` (moved without them, or
    `data.root` pointing at the wrong folder)."""


class StaleCacheError(RuntimeError):
    """The cache on disk was built for different data, backbone or clip settings."""


class SplitFileError(ValueError):
    """A split, list or class-names file that cannot be read as written (exit 2)."""


class ClusterUnavailable(RuntimeError):
    """The Ray cluster to join cannot be joined as it is (exit 6)."""
