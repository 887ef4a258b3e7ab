"""FG/BG cells from a pseudo-label map (DiPS/F-CAM): Otsu region, eroded core, lowest-fraction background,
and the balanced draw of equal FG and BG cells re-done at every step."""
from __future__ import annotations

import numpy as np
import torch


def otsu_regions(cam: np.ndarray, erosion: int) -> tuple[np.ndarray, np.ndarray]:
    """(FG region, eroded FG core) from a [0, 1] map: Otsu's threshold on floor(cam·255) (DiPS).

    ``erosion``: the square kernel on the map's grid (1 = none; an erosion that empties the region keeps
    it un-eroded). A constant map has no FG: both masks are empty.
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    u8 = np.floor(np.clip(cam, 0, 1) * 255).astype(np.uint8)
    if u8.min() == u8.max():
        empty = np.zeros(cam.shape, bool)
        return empty, empty
    region = u8 > threshold_otsu(u8)
    core = region
    if erosion > 1:
        eroded = ndimage.binary_erosion(region, structure=np.ones((erosion, erosion), bool), border_value=1)
        if eroded.any():
            core = eroded
    return region, core


def fg_bg_candidates(cam: np.ndarray, n_fg: int, n_bg: int, erosion: int, bg_fraction: float
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices of FG candidates (the n_fg highest cells of the eroded Otsu region) and BG candidates
    (the n_bg lowest cells outside the region among the lowest ``bg_fraction`` of all cells); n = 0 means all
    of them. Highest/lowest first; cells in neither set are unlabelled."""
    if not 0.0 < bg_fraction <= 1.0:
        raise ValueError(f"sampling.bg_fraction must be in (0, 1], got {bg_fraction}")
    region, core = otsu_regions(cam, erosion)
    flat = cam.ravel()
    fg = np.flatnonzero(core.ravel())
    fg = fg[np.argsort(-flat[fg], kind="stable")]
    lowest = np.argsort(flat, kind="stable")[:int(np.ceil(bg_fraction * flat.size))]
    bg = lowest[~region.ravel()[lowest]]
    if not region.any():  # no FG at all: nothing to sample on either side
        bg = bg[:0]
    if n_fg > 0:
        fg = fg[:n_fg]
    if n_bg > 0:
        bg = bg[:n_bg]
    return fg, bg


def sample_balanced(fg: np.ndarray, bg: np.ndarray, k: int, generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw m = min(k, |fg|, |bg|) cells from each set without replacement; pad to k with -1."""
    m = min(int(k), len(fg), len(bg))
    out_fg = torch.full((int(k),), -1, dtype=torch.long)
    out_bg = torch.full((int(k),), -1, dtype=torch.long)
    if m > 0:
        pf = torch.randperm(len(fg), generator=generator)[:m]
        pb = torch.randperm(len(bg), generator=generator)[:m]
        out_fg[:m] = torch.from_numpy(np.asarray(fg)[pf.numpy()]).long()
        out_bg[:m] = torch.from_numpy(np.asarray(bg)[pb.numpy()]).long()
    return out_fg, out_bg


def erosion_on_grid(kernel_px: int, input_size: int, grid: int) -> int:
    """DiPS's erosion kernel (pixels at ``input_size``) scaled to the z_p grid, odd, ≥ 1."""
    if kernel_px <= 1:
        return 1
    k = max(1, int(round(kernel_px * grid / input_size)))
    return k if k % 2 == 1 else k + 1
