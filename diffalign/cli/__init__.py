"""The ``diffalign`` command line: one module per subcommand, each with ``register(subparsers)`` and ``run(args)``.

``main.COMMANDS`` lists the subcommand modules; adding a command is one module plus one entry there.
"""

from diffalign.errors import UserError


class CLIError(UserError):
    """A user-facing command-line failure: printed as one line (no traceback), exit status 1."""
