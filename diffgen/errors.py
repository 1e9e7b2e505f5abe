"""User-facing errors.

Every error a user can cause (bad input files, bad arguments, missing or corrupt
checkpoints) is raised as :class:`DiffgenError`; the CLI turns it into a one-line
message on stderr and a non-zero exit code instead of a traceback.
"""


class DiffgenError(Exception):
    """An error caused by user input; its message is a single line meant for the user."""
