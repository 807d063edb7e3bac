"""Errors of the model layer."""

from __future__ import annotations


class ConfigError(ValueError):
    """A model config that cannot be turned into a spec; the message names what is missing."""
