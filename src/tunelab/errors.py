"""Errors meant for people: each says where the problem is and what to do next."""

from __future__ import annotations


class TunelabError(Exception):
    """A problem the user can fix. `hint` says how."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  hint: {hint}")


class ConfigError(TunelabError):
    """A config key with a bad value; the message names the key and the accepted values."""


class DataError(TunelabError):
    """A bad row or file; carries the location so messages read `file:line: field: reason`."""

    def __init__(
        self,
        reason: str,
        source: str | None = None,
        line: int | None = None,
        field: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.reason = reason
        self.source = source
        self.line = line
        self.field = field
        where = ":".join(str(p) for p in (source, line) if p is not None)
        parts = [p for p in (where, f"field '{field}'" if field else None, reason) if p]
        super().__init__(": ".join(parts), hint)


class ModelLoadError(TunelabError):
    """A model or tokenizer that cannot be found or loaded."""
