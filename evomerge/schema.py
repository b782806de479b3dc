"""The base every experiment-file model shares: strict fields, and errors that name the field.

Light on purpose (pydantic only): the kinds' space configs, the fitness config and the
experiment config all build on it, and a mistyped field must be reported in well under a second.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """The experiment file is wrong; the message names the field and how to fix it."""


class FieldErrors(ValueError):
    """Raised by a validator: (path below the validated model, message) pairs, reported one a line."""

    def __init__(self, *errors: tuple[tuple[str | int, ...], str]) -> None:
        self.errors = list(errors)
        super().__init__("; ".join(f"{dotted(p)}: {m}" for p, m in self.errors))


def dotted(loc) -> str:
    """('fitness', 'tasks', 0, 'weight') -> 'fitness.tasks[0].weight' (the field as written in YAML)."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class Strict(BaseModel):
    """Unknown fields are errors: a misspelled option must not be silently ignored."""

    model_config = ConfigDict(extra="forbid")
