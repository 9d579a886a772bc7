"""The one exception a user's mistake raises: scripts print it as one line and exit non-zero."""


class UserError(Exception):
    """A mistake the user can fix; printed as one line, never as a traceback."""
