"""The errors of the data path: a problem with the user's data, with where it is."""

from __future__ import annotations

from ..config.errors import UserError


class DataError(UserError, ValueError):
    """A problem with the user's data, with where it is."""


class MissingSplitError(DataError):
    """The dataset has no such split (its message names the splits it has). Callers that may
    fall back, such as an optional held-out split, catch this type, never the message."""
