"""The one place where both command lines turn a refused input into what a user sees: one line on stderr and exit
status 2, no traceback. Anything else (a bug) keeps its traceback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.markup import escape

from advbct.errors import AdvbctError

errors = Console(stderr=True, soft_wrap=True)  # one unwrapped line per error, whatever the terminal width
# A path the user named that does not exist is a refusal of input as well, raised by the standard library.
REFUSED = (AdvbctError, FileNotFoundError)


@contextmanager
def refused_as_exit() -> Iterator[None]:
    """Run the body; a refused input ends the command with its message and status 2."""
    try:
        yield
    except REFUSED as exc:
        errors.print(f"[red]error:[/] {escape(str(exc))}")  # a message's own brackets are text, not markup
        raise typer.Exit(2) from None
