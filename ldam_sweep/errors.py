"""Errors a user can act on: each names the field or thing, the value, and what is allowed."""

from __future__ import annotations


class LdamError(Exception):
    """Base class for every error ldam-sweep raises for a user to act on; the CLI prints these
    without a traceback and exits with the class's ``exit_code`` (docs/guarantees.md, "Exit codes")."""

    exit_code: int = 2  # bad input: spec, arguments, files the spec names, a store from another spec


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


class CorruptBlockError(StoreError):
    """A committed block's stored data does not match its recorded checksum, or cannot be read."""

    exit_code = 1


class StoreDamagedError(StoreError):
    """A file the store depends on (its metadata, its discriminator, a manifest part) is damaged:
    ``ldam-sweep verify STORE`` says which and what repairs it."""

    exit_code = 1


class RayStartError(LdamError):
    """Ray could not be started or joined."""

    exit_code = 3


class NoWorkersError(RayStartError):
    """No worker can run any more: every actor failed to start or died for good (a cluster fault)."""


class StorageStopError(LdamError):
    """A persistent storage error (disk full, quota, read-only, permission) or storage that stopped
    answering stopped the sweep."""

    exit_code = 4


class StorageUnreachableError(StorageStopError):
    """The store did not answer (an object store's outage, a network cut) for longer than the
    sweep's patience, or at all for a reader."""


class StoreOwnedError(StoreError):
    """The store is owned by another live driver."""

    exit_code = 5


class StoreReplacedError(StoreError):
    """The store was replaced (new generation) or its lease taken over while this driver ran."""

    exit_code = 5


def repair_hint(url: str) -> str:
    """The commands that repair a store with corrupt blocks."""
    return (f"repair: `ldam-sweep verify {url} --repair`, then `ldam-sweep run SPEC --store {url}` "
            "(SPEC: the job spec this store was made from) redoes exactly those blocks")


class CompareError(LdamError):
    """The two stores cannot be compared (other architecture or other sampler settings)."""


def did_you_mean(value: str, allowed: list[str], limit: int = 3) -> str:
    """A short ' Did you mean ...?' hint for a misspelt name, or '' when nothing is close."""
    import difflib

    close = difflib.get_close_matches(value, allowed, n=limit, cutoff=0.6)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
