"""How a bad config is reported: one error type, and pydantic's errors as one line per problem
that names the offending field (its `loc`)."""

from __future__ import annotations

from pydantic import ValidationError


class ConfigError(ValueError):
    """A config that cannot be deployed, with a message a newcomer can act on."""


def describe_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        lines.append(f"  {loc}: {e['msg']}")
    return "invalid config:\n" + "\n".join(lines)
