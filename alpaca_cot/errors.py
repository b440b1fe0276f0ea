"""The one error type for user mistakes, and helpers to word its messages.

Entry scripts catch :class:`UserError`, print ``error: <message>`` to stderr and
exit non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Iterable
from typing import NoReturn


class UserError(Exception):
    """A mistake the user can fix: the message says what, where and how."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's one-line mistakes: ``error: ...`` naming the flag, exit 2 (usage is --help's)."""

    def error(self, message: str) -> NoReturn:  # noqa: D102
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean X?)' for the closest choice, or '' if none is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_name(kind: str, name: str, choices: Iterable[str], flag: str) -> UserError:
    """Build the error for a name that is not in a registry."""
    choices = sorted(choices)
    return UserError(
        f"{flag}: unknown {kind} {name!r}{did_you_mean(name, choices)}; "
        f"choose one of: {', '.join(choices)}"
    )
