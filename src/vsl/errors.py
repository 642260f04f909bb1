"""User-facing errors.

Every problem caused by the user's input (a missing file, a malformed caption line, a checkpoint
that does not fit the data) raises a subclass of :class:`VSLError` whose message is one line naming
the file and what was expected. The command line prints that line and exits with status 2 instead
of showing a traceback.
"""


class VSLError(Exception):
    """Base class of errors that the command line reports as one line with exit status 2."""

    def __init__(self, message: object = "", *args: object) -> None:
        text = str(message)
        if text.startswith("Caught ") and "\nOriginal Traceback" in text:
            # Re-raised by a DataLoader worker, whose message carries the worker's traceback; keep
            # the original one-line message, its last line after "vsl.errors.DataError: ".
            last = text.rstrip().splitlines()[-1]
            message = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(message, *args)


class DataError(VSLError):
    """A data file (features, captions, vocabulary) is missing or malformed."""


class CheckpointError(VSLError):
    """A checkpoint file is missing, truncated or not a checkpoint, or its weights do not fit the model."""


class ConfigError(VSLError):
    """An option or a combination of options is invalid."""


class FitError(ConfigError):
    """A model's options do not fit the data (vocabulary size, feature dimension, regions per image)."""


class ImageError(DataError):
    """An image file is missing, empty, not an image, truncated or corrupt, too small, or too large
    to decode safely (a decompression bomb)."""
