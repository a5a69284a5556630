"""One base class for mistakes a user can fix: the CLI prints them as one line, no traceback."""


class UserError(ValueError):
    """Bad input (files, config, devices); the message names the file/line/field and the fix."""
