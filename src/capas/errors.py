"""The one exception type for mistakes a user can fix: the CLI prints its message, never a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence


class CapasError(Exception):
    """A user-facing error: bad spec, missing dataset, damaged run directory…"""


class Terminated(KeyboardInterrupt):
    """SIGTERM (`docker stop`, a scheduler, `timeout`) raised where Ctrl-C would be, so that it cleans up as
    Ctrl-C does: no temporary folder left beside a run, a study's workers stopped."""


def closest(name: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest valid name, or '' when nothing is close."""
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    match = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.5)
    return f" (did you mean {lowered[match[0]]!r}?)" if match else ""


def first_of(names: Sequence[str], shown: int) -> str:
    """Names for a message, the first `shown` of them: "a, b, c and 2 more"."""
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
