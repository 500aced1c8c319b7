"""Sampling: per-chain noise, the update rules (``ldam``, ``sgld``, ``am``), and ``sample``."""

from ldam_sweep.sampling.chains import ChainResult, sample
from ldam_sweep.sampling.langevin import LdamOptions, SgldOptions

__all__ = ["ChainResult", "LdamOptions", "SgldOptions", "sample"]
