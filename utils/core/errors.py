"""The project's own error for bad input.

`InputError` is raised where input from whoever runs the adapter is wrong: a
configuration value, a data folder, a label map, a checkpoint, an image. Its
message names the item, file or key and says what to change, so a command line
can show it as one line (the local runner exits with code 2); any other
exception is a bug and keeps its traceback. It is a ValueError, so callers that
caught ValueError before keep working.
"""


class InputError(ValueError):
    """Bad input, explained in the message (which item, file or key; what to change)."""


class DiskFullError(InputError):
    """A write failed because the disk (or the user's quota) is full; the message names the file.

    An InputError: freeing space or pointing the output elsewhere is the user's move, and the
    local runner shows it as one line (exit 2). The file that was there before is kept.
    """
