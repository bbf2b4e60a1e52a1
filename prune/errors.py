"""The one exception type the library raises for bad input; the CLI prints it as `Error: ...`."""


class PruneError(Exception):
    """A user-facing error: the message names the bad value and what is accepted."""
