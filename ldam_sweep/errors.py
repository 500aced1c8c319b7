"""Errors a user can act on: each names the field or thing, the value, and what is allowed."""

from __future__ import annotations


class LdamError(Exception):
    """Base class for every error ldam-sweep raises on bad input; the CLI prints these without a traceback
    and exits with the class's ``exit_code``."""

    exit_code: int = 2


class SpecError(LdamError, ValueError):
    """A job or model spec is invalid (unknown field, wrong type, value out of range)."""


class ModelError(LdamError):
    """A model cannot be loaded or does not fit its input spec (unknown name, bad weights file, wrong shape)."""


class LayerError(LdamError, KeyError):
    """A layer name or unit index does not exist in the model."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class SamplerError(LdamError, ValueError):
    """Sampler arguments are invalid (unknown option, bad init array, bad discriminator output)."""


class DataError(LdamError, ValueError):
    """A real-data source is unusable (missing file, unreadable image, wrong shape or range)."""


class StoreError(LdamError):
    """A store cannot be created, written or read as asked (not a store, other spec, missing unit)."""


class StoreOwnedError(StoreError):
    """Another live driver holds the store's lease; nothing was changed."""

    exit_code = 5


class StoreReplacedError(StoreError):
    """The store was replaced (new generation) or its lease taken over while this driver ran."""

    exit_code = 5


class CompareError(LdamError):
    """The two stores cannot be compared (other architecture or other sampler settings)."""


def did_you_mean(value: str, allowed: list[str], limit: int = 3) -> str:
    """A short ' Did you mean ...?' hint for a misspelt name, or '' when nothing is close."""
    import difflib

    close = difflib.get_close_matches(value, allowed, n=limit, cutoff=0.6)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
