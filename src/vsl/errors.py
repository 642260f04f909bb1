"""User-facing errors.

Every problem caused by the user's input (a missing file, a malformed caption line, a checkpoint
that does not fit the data) raises a subclass of :class:`VSLError` whose message is one line naming
the file and what was expected. The command line prints that line and exits with status 2 instead
of showing a traceback.
"""


class VSLError(Exception):
    """Base class of errors that the command line reports as one line with exit status 2."""


class DataError(VSLError):
    """A data file (features, captions, vocabulary) is missing or malformed."""


class CheckpointError(VSLError):
    """A checkpoint file is missing, truncated, not a checkpoint, or does not fit the model/data."""


class ConfigError(VSLError):
    """An option or a combination of options is invalid."""
