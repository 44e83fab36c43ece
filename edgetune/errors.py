"""The one exception type users see: a single line naming the file or key and the fix."""


class UserError(Exception):
    """Bad input from the user. The CLI prints the message on one line and exits with code 2."""
