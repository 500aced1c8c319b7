"""One unit of a sweep as a notebook-friendly object: ``st.unit("fc2", 3)`` shows its chains x
snapshots as a picture (``_repr_png_``), and ``.to_xarray()`` gives labelled arrays."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ldam_sweep.errors import StoreError

if TYPE_CHECKING:
    import xarray
    from PIL import Image


@dataclass
class UnitView:
    """A committed unit's arrays and manifest row, read once."""

    layer: str
    unit: int
    samples: np.ndarray  # (chain, snapshot, C, H, W) float32, pixel space
    activation: np.ndarray  # (chain, steps + 1)
    realism: np.ndarray | None  # (chain, steps + 1) log D, when the sweep had a discriminator
    exemplars: np.ndarray | None  # (k, C, H, W) top real images, when the sweep had data
    exemplar_activation: np.ndarray | None  # (k,)
    scores: dict[str, Any]  # the unit's manifest row (every score column)
    snapshot_steps: np.ndarray  # the step of each snapshot
    value_range: tuple[float, float]

    def image(self) -> "Image.Image":
        """Chains (rows) x snapshots (columns), each cell labelled with its activation: what
        ``ldam-sweep show`` writes, with the snapshot steps as column headers."""
        from ldam_sweep.render import unit_grid

        return unit_grid(self.samples, self.activation, self.snapshot_steps, self.value_range)

    def _repr_png_(self) -> bytes:
        """Jupyter / IPython display hook."""
        buf = io.BytesIO()
        self.image().save(buf, format="PNG")
        return buf.getvalue()

    def _repr_html_(self) -> str:
        """Jupyter: the picture and the unit's main scores."""
        from ldam_sweep.notebook import unit_html

        return unit_html(self)

    def to_xarray(self) -> "xarray.Dataset":
        """The unit as an ``xarray.Dataset`` with named dims (chain, snapshot, step, c, y, x, rank)
        and the manifest row as attrs. Needs the optional extra: ``pip install 'ldam-sweep[xarray]'``."""
        try:
            import xarray as xr
        except ImportError:
            raise StoreError("UnitView.to_xarray needs xarray, an optional extra: pip install 'ldam-sweep[xarray]'") from None
        steps = np.arange(self.activation.shape[1])
        data: dict[str, Any] = {
            # thumbnails (a store that shrinks snapshots) get their own dimensions: xarray allows one size per name
            "samples": (("chain", "snapshot", "c", *self._sample_yx()), self.samples),
            "activation": (("chain", "step"), self.activation),
        }
        if self.realism is not None:
            data["realism"] = (("chain", "step"), self.realism)
        if self.exemplars is not None:
            data["exemplars"] = (("rank", "c", "y", "x"), self.exemplars)
            data["exemplar_activation"] = (("rank",), self.exemplar_activation)
        attrs = {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in self.scores.items() if v is not None}
        return xr.Dataset(data, coords={"snapshot": np.asarray(self.snapshot_steps), "step": steps},
                          attrs={**attrs, "value_range": list(self.value_range)})

    def _sample_yx(self) -> tuple[str, str]:
        full = self.exemplars is None or self.exemplars.shape[-2:] == self.samples.shape[-2:]
        return ("y", "x") if full else ("thumb_y", "thumb_x")

    def __repr__(self) -> str:
        ratio = self.scores.get("activation_ratio")
        extra = f", activation ratio {ratio:.3g}" if isinstance(ratio, float) else ""
        if self.scores.get("label") is not None:
            extra += f", label {self.scores['label']} (purity {self.scores.get('label_purity') or 0:.2f})"
        return (f"UnitView({self.layer!r}, unit {self.unit}: {self.samples.shape[0]} chains x "
                f"{self.samples.shape[1]} snapshots of {tuple(self.samples.shape[2:])}, final activation "
                f"{np.nanmean(self.activation[:, -1]):.4g}{extra})")
