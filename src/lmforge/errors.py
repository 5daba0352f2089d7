"""The one exception type for bad user input.

Raised with a one-line message that names the problem and the fix; the command-line entry
points print it as ``error: ...`` and exit with status 2, without a traceback.
"""


class LMForgeError(ValueError):
    """Bad input (config, data, checkpoint) that the user can fix."""
