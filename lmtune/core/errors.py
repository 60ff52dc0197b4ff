"""The one error type a user sees without a stack trace."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A mistake in the user's config, command line or data that the user can fix.

    The CLI prints only the message (no traceback, unless ``--debug``) and exits
    with status 2.
    """


ConfigError = UserError  # the name most of lmtune raises it by (configs are where most such mistakes are)


def nearest(name: str, candidates: Iterable[str]) -> str:
    """A ``; did you mean 'x'?`` hint for ``name``, or an empty string."""
    matches = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=1, cutoff=0.5)
    return f"; did you mean {matches[0]!r}?" if matches else ""
