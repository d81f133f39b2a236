"""The one exception type npsparse raises for bad input (the CLI prints it as one line)."""


class NpsparseError(Exception):
    """A user-facing error: bad file, unsupported model, impossible parameter.

    The message is one line that names the file or parameter and the problem.
    """
