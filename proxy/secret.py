"""A string that never prints itself: credentials, tokens and signing keys are held as `Secret`.

Owns masking; it does not own where secrets come from (that is config's job).
"""

from __future__ import annotations


class Secret:
    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The value itself, for the one place that must send it to the platform."""
        return self._value

    def masked(self) -> str:
        return mask(self._value)

    def __repr__(self) -> str:
        return f"Secret({self.masked()})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


def mask(value: str) -> str:
    """No character of the secret and not its length: summaries say only that one is set."""
    return "****" if value else ""
