"""The ``diffalign`` command line: one module per subcommand, each with ``register(subparsers)`` and ``run(args)``.

``main.COMMANDS`` lists the subcommand modules; adding a command is one module plus one entry there.
"""

import argparse

from diffalign.errors import UserError


class CLIError(UserError):
    """A user-facing command-line failure: printed as one line (no traceback), exit status 1."""


OVERRIDES_METAVAR = "[key=value ...]"


def document_overrides(parser: argparse.ArgumentParser) -> None:
    """Show in ``parser``'s usage and help that it takes ``key=value`` config overrides.

    ``main`` collects the overrides from the arguments argparse leaves over (so they may stand anywhere after the
    subcommand, between options); a positional argument for them would swallow them instead. So they are
    documentation only: appended to the usage line argparse builds from the parser's arguments, and explained in
    a help section of their own. Call it last in ``register``, after every argument is added.
    """
    usage = parser.format_usage().removeprefix("usage: ").rstrip()
    parser.usage = f"{usage} {OVERRIDES_METAVAR}"
    parser.add_argument_group(
        "config overrides (key=value)",
        "A dotted config key and its value, parsed as YAML, e.g. optim.lr=1e-5 run.max_steps=10: any number of "
        "them, anywhere after the subcommand, applied in order.",
    )
