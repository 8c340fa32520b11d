"""An interactive band explorer: move the band edges, see the filtered images and the AUC.

The AUC comes from cached per-image ring energies (see :mod:`fcre_utils.analysis`), so moving a
slider costs a sum over rings, not a pass over the images. Band edges snap to ring edges.
Run headless (papermill, nbval, a script), the explorer draws one static figure at the given
edges. In a live notebook it adds a range slider that redraws that figure.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch

from .analysis import auc, band_l2_from_rings
from .frequency import bandpass
from .plotting import image_grid


class BandExplorer:
    """Band-filtered example images and the band's L2 AUC for any band made of whole rings.

    Args:
        originals, reconstructions: a few example images (n, C, H, W) to display.
        energies: ring energies (N, n_rings) of every scored image.
        edges: the rings behind ``energies``.
        labels: member flags (N,) of the scored images.
    """

    def __init__(self, originals: torch.Tensor, reconstructions: torch.Tensor, energies: np.ndarray, edges: list[tuple[float, float]],
                 labels: np.ndarray):
        if len(energies) != len(labels):
            raise ValueError(f"{len(energies)} rows of ring energies for {len(labels)} labels; give one label per scored image")
        self.originals, self.reconstructions = originals, reconstructions
        self.energies, self.edges, self.labels = energies, edges, np.asarray(labels, dtype=bool)
        self.boundaries = [edges[0][0], *(high for _, high in edges)]

    def snap(self, low: float, high: float) -> tuple[float, float]:
        """Return the nearest ring edges to ``low`` and ``high``, keeping at least one ring between them."""
        points = np.array(self.boundaries)
        i = int(np.abs(points - low).argmin())
        j = max(int(np.abs(points - high).argmin()), i + 1)
        return float(points[min(i, len(points) - 2)]), float(points[min(j, len(points) - 1)])

    def band_auc(self, low: float, high: float) -> float:
        """AUC of the L2 score in the band ``[low, high)`` (edges snapped to rings)."""
        return auc(self.labels, band_l2_from_rings(self.energies, self.edges, *self.snap(low, high)))

    def figure(self, low: float, high: float) -> plt.Figure:
        """Draw the band of each example's original, reconstruction and error, titled with the band's AUC."""
        low, high = self.snap(low, high)
        original = bandpass(self.originals, low, high)
        reconstruction = bandpass(self.reconstructions, low, high)
        rows = {"image": self.originals, "band of original": original, "band of reconstruction": reconstruction,
                "band error": reconstruction - original}
        fig = image_grid(rows, n=len(self.originals), symmetric={"band of original", "band of reconstruction", "band error"})
        fig.suptitle(f"band [{low:g}, {high:g}): L2 AUC {self.band_auc(low, high):.3f}", y=1.02)
        return fig

    def widget(self, low: float, high: float):
        """Return a range slider over ring edges and the figure it redraws (needs a live notebook)."""
        import ipywidgets
        from IPython.display import display

        low, high = self.snap(low, high)
        slider = ipywidgets.SelectionRangeSlider(
            options=[(f"{b:g}", b) for b in self.boundaries], index=(self.boundaries.index(low), self.boundaries.index(high)),
            description="band", layout=ipywidgets.Layout(width="600px"),
        )
        output = ipywidgets.Output()

        def redraw(change=None):
            with output:
                output.clear_output(wait=True)
                fig = self.figure(*slider.value)
                display(fig)
                plt.close(fig)

        slider.observe(redraw, names="value")
        redraw()
        return ipywidgets.VBox([slider, output])
