"""The exceptions the library raises for bad input; the CLI prints them as `Error: ...`.

Torch-free, so the CLI can catch and explain them without loading any model code.
"""


class PruneError(Exception):
    """A user-facing error: the message names the bad value and what is accepted."""


class FastEngineUnsupported(PruneError):
    """The fast evaluation engine cannot serve this task or model, while the lm-eval engine can.

    `reason` is the message. The "auto" engine catches this and falls back to lm-eval; the CLI
    adds a hint on how to choose that engine directly.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
