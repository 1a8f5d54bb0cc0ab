"""User-facing errors.

Anything a user can cause (a wrong path, a corrupt file, a bad config value) raises
:class:`FlowmanipError`. The CLI prints its message as one line and exits with code 2;
``--debug`` shows the traceback instead.
"""


class FlowmanipError(Exception):
    """An error the user can fix. The message names the file or key and what was expected."""
