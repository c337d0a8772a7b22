"""Why a backend cannot run a call: reasons with a machine-readable code."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reason:
    """One reason a backend refuses a problem.

    ``code`` is stable and meant for code (never branch on ``message``);
    ``message`` names the value received and what is allowed.
    """

    code: str
    message: str

    def __str__(self) -> str:
        return self.message


def allowed(name: str, value, supported) -> Reason:
    """``name=value (supported: a, b, c)`` built from the same constant the check uses."""
    listed = ", ".join(str(s) for s in supported)
    return Reason(name, f"{name}={value} (supported: {listed})")


class UnsupportedError(ValueError):
    """No backend (or not the forced one) can run a call.

    ``reasons`` maps each backend name to the list of its reasons (strings).
    """

    def __init__(self, message: str, reasons: dict[str, list[str]] | None = None):
        super().__init__(message)
        self.reasons = dict(reasons or {})
