"""Error types with no better home; each one a process turns into one error line and an exit status.

A process maps a failure's type to its exit status (lenet_dist/run/exitcodes.py), and lenet-launch decides
from that status alone, never from the error's type name or text. DataError (data/dataset.py),
CheckpointError (checkpoint.py) and TrainingError (parallel/step.py) live beside the code that raises them.
"""


class ResumeError(ValueError):
    """A --resume that must not go on: the checkpoint was made with another configuration or other data.
    Restarting cannot fix it; the message says what differs and how to go on."""


class UsageError(ValueError):
    """A flag's value that is wrong for what the run finds (--val-size larger than the data): a usage error
    found after the flags were parsed. The message names the flag and the limit."""


class CheckpointFolderError(OSError):
    """The checkpoint folder cannot be written (read-only, full, no permission): every restart would fail the
    same way. The message names the folder or file and the reason."""
