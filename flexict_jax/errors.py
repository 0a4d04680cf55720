"""The one error type for a bad configuration: every config check raises it, naming the key and the fix.

It is both a ValueError (a bad value) and a KeyError (a missing or unknown key), so callers that catch either
keep working; `python -m flexict_jax.train` catches exactly this type and prints its one line.
"""
from __future__ import annotations


class ConfigError(KeyError, ValueError):
    """A config key that is missing, unknown or has a value the run cannot use."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
