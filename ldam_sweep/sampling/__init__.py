"""Sampling: objectives, per-chain noise, the two Langevin update rules, and ``sample``."""

from ldam_sweep.sampling.chains import ChainResult, sample
from ldam_sweep.sampling.langevin import LdamOptions, SgldOptions

__all__ = ["ChainResult", "LdamOptions", "SgldOptions", "sample"]
