"""The boxes of every threshold of a score map in one sweep: a component tree built with union-find.

MaxBoxAcc thresholds a uint8 map at up to 100 levels and needs, per level, the box of every contour of
the mask u > t (V2: outer contours of the 8-connected components, and holes) or of the contour with
the largest cv2.contourArea (v1). Rather than trace contours once per level, the pixels are added from
the highest value down, each joined to its already-added 8-neighbours (union-find, numba-compiled);
when a level's set is complete its components are read off. Each component carries its box, its size,
its first pixel in raster order and two integers updated from the 2×2 pixel windows ("cells") that
gain a corner:

- twice its outer contour's area if it has no hole. The polygon through the boundary pixels' centres
  covers a cell with all 4 corners in the component fully and a cell with 3 by half (the corner is cut
  along the diagonal); cells with ≤ 2 corners add nothing. That is cv2.contourArea of the traced
  contour exactly (tests/test_component_tree.py checks it against OpenCV);
- 4 × its Euler number, by bit-quad counting (8-connected foreground, 4-connected background, as
  findContours): Q1 − Q3 − 2·Q_diagonal; holes = 1 − Euler number.

Equal areas go to the component found last in raster order (OpenCV lists outer contours in reverse
order of discovery, and max() keeps the first). A hole makes the outer contour enclose more than the
component's own cells, and the components inside a hole are listed out of raster order, so a v1 level
where a holed component could change the choice is returned UNDECIDED: the caller traces that level
with OpenCV. V2's hole boxes come from a second, ascending sweep over the background (4-connected
components of u ≤ t that do not reach the image frame), run only for the levels where a hole's box
could beat the outer boxes (and, given the IoU thresholds the result is compared with, reach the next
one: MaxBoxAcc keeps nothing finer).
"""
from __future__ import annotations

import threading

import numpy as np
from numba import njit

UNDECIDED = -2.0


@njit(cache=True, nogil=True)
def _root(parent: np.ndarray, p: int) -> int:
    """The root pixel of p's component (parent < 0 marks a root), halving the path on the way."""
    while True:
        q = parent[p]
        if q < 0:
            return p
        g = parent[q]
        if g < 0:
            return q
        parent[p] = g
        p = g


def _quad_weight(bits: int) -> int:
    """4 × the Euler-number contribution of one cell with corners ``bits`` (bit k = corner k, in the
    order top-left, top-right, bottom-left, bottom-right): Q1 +1, Q3 −1, diagonal pair −2."""
    n = bin(bits).count("1")
    return {1: 1, 3: -1}.get(n, -2 if bits in (0b1001, 0b0110) else 0)


# the 8 neighbours of a pixel as (dy, dx), bit k of a neighbourhood mask, in ring order: two neighbours
# next to each other in the ring are themselves neighbours (``offsets`` in _sweep follows this order)
_NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1))


def _cell_table() -> np.ndarray:
    """(Δ 2·area, Δ 4·Euler) of a component when a pixel joins it, for each of the 256 masks of its
    already-added 8-neighbours: the four cells around the pixel each gain one corner."""
    table = np.zeros((256, 2), np.int64)
    for mask in range(256):
        present = {(0, 0)} | {_NEIGHBOURS[k] for k in range(8) if mask >> k & 1}
        for cy in (-1, 0):
            for cx in (-1, 0):
                corners = [(cy, cx), (cy, cx + 1), (cy + 1, cx), (cy + 1, cx + 1)]
                after = sum(1 << k for k, c in enumerate(corners) if c in present)
                before = sum(1 << k for k, c in enumerate(corners) if c in present and c != (0, 0))
                n_before = bin(before).count("1")
                # twice the polygon area inside the cell: 3 corners → 1 (a half cell), 4 → 2
                table[mask, 0] += n_before in (2, 3)
                table[mask, 1] += _quad_weight(after) - _quad_weight(before)
    return table


_CELLS = _cell_table()


def _runs_table(connectivity: int) -> np.ndarray:
    """Per mask of added 8-neighbours: [count, the neighbours whose components the pixel joins]. Added
    neighbours that touch each other are in one component already, so one per group is enough: with
    8-connectivity a run of consecutive neighbours in the ring; with 4-connectivity (only N, E, S, W
    count) two consecutive ones whose diagonal between them is added too."""
    table = np.zeros((256, 5), np.int64)
    for mask in range(256):
        bit = [mask >> j & 1 for j in range(8)]
        if connectivity == 8:
            picks = [j for j in range(8) if bit[j] and not bit[j - 1]] or ([0] if mask else [])
        else:
            sides = [j for j in (1, 3, 5, 7) if bit[j]]
            picks = [j for j in sides if not (bit[j - 2] and bit[j - 1])] or sides[:1]
        table[mask, 0] = len(picks)
        table[mask, 1:1 + len(picks)] = picks
    return table


_RUNS8, _RUNS4 = _runs_table(8), _runs_table(4)


@njit(cache=True, nogil=True)
def _overlap(x0: int, y0: int, x1: int, y1: int, gt: np.ndarray, g: int) -> tuple:
    """(|box ∩ G|, |G|) for GT box g, with the +1 pixel convention of boxes._iou_plus1."""
    ix = min(x1, gt[g, 2]) - max(x0, gt[g, 0]) + 1
    iy = min(y1, gt[g, 3]) - max(y0, gt[g, 1]) + 1
    return max(0, ix) * max(0, iy), (gt[g, 2] - gt[g, 0] + 1) * (gt[g, 3] - gt[g, 1] + 1)


@njit(cache=True, nogil=True)
def _best_iou(x0: int, y0: int, x1: int, y1: int, gt: np.ndarray) -> float:
    """Max IoU of one box against the GT boxes, as boxes._iou_plus1 (a pair whose union is ≤ 0 gets 0)."""
    best = 0.0
    area_a = (x1 - x0 + 1) * (y1 - y0 + 1)
    for g in range(gt.shape[0]):
        inter, area_g = _overlap(x0, y0, x1, y1, gt, g)
        den = area_a + area_g - inter
        best = max(best, inter / den if den > 0 else 0.0)
    return best


LARGEST, ALL, HOLES = 0, 1, 2  # what a level's boxes are: see _snapshot


@njit(cache=True, nogil=True)
def uint8_profile(scoremap: np.ndarray) -> tuple:
    """One pass over a score map, without the GIL: u = uint8(map · 255) (truncation, the map taken in
    float64, as the reference), the histogram of u, and the max of u along each row and column."""
    height, width = scoremap.shape
    u = np.empty((height, width), np.uint8)
    hist = np.zeros(256, np.int64)
    rows = np.zeros(height, np.uint8)
    cols = np.zeros(width, np.uint8)
    for y in range(height):
        for x in range(width):
            v = np.uint8(np.float64(scoremap[y, x]) * 255.0)
            u[y, x] = v
            hist[v] += 1
            rows[y] = max(rows[y], v)
            cols[x] = max(cols[x], v)
    return u, hist, rows, cols


MAX_SIDE = 32767  # boxes are int16 and pixels are packed as y << 16 | x


def _check_size(shape: tuple[int, ...]) -> None:
    if len(shape) != 2 or not 0 < shape[0] <= MAX_SIDE or not 0 < shape[1] <= MAX_SIDE:
        raise ValueError(f"MaxBoxAcc evaluates 2-D maps of 1 to {MAX_SIDE} pixels a side, got shape {shape}; "
                         "resize the maps to the evaluation resolution first (wsolbench.metrics.prepare_map)")


_local = threading.local()


def _workspace(shape: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """The sweep's arrays, kept per thread for the last image size: allocating them afresh for every
    image (about 1.5 MB at 224×224, pages that fault in again) made the sweep ~30% slower."""
    if getattr(_local, "shape", None) != shape:
        n = (shape[0] + 2) * (shape[1] + 2)
        _local.shape = shape
        _local.work = (np.empty(n, np.int32), np.empty(n, np.uint8), np.empty((n, 4), np.int16),
                       np.empty((7, n), np.int32))
    return _local.work


def level_best_iou(u: np.ndarray, ts: np.ndarray, gt: np.ndarray, multi_contour: bool) -> np.ndarray:
    """For each integer threshold t in ``ts`` (ascending, each leaving ≥ 1 pixel of ``u`` above it):
    the best IoU against ``gt`` of the box(es) the reference takes from the mask ``u > t`` (largest
    contour for v1, every contour for V2), or UNDECIDED where a hole leaves v1 open."""
    u = np.ascontiguousarray(u, np.uint8)
    _check_size(u.shape)
    return _levels(u, np.asarray(ts, np.int64), np.asarray(gt, np.int64).reshape(-1, 4), multi_contour,
                   _EXACT, *_workspace(u.shape))


_EXACT = np.empty(0)  # no IoU thresholds: every level's best IoU exactly


def image_best_iou(scoremap: np.ndarray, gt: np.ndarray, thresholds: np.ndarray, multi_contour: bool,
                   deltas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The MaxBoxAcc rule for one map, compiled end to end (see boxes.image_best_iou, which finishes
    the UNDECIDED levels): per τ the best IoU (−1 if pruned, or UNDECIDED), the integer threshold and
    the box x0, y0, x1, y1 of all pixels above it; and the uint8 map. ``deltas``: the IoU thresholds
    (ascending fractions) the result is compared with; empty for exact values."""
    # float32 and float64 compile as they are; other dtypes (float16, ...) are taken exactly in float64
    native = scoremap.dtype in (np.float32, np.float64)
    scoremap = np.ascontiguousarray(scoremap, None if native else np.float64)
    _check_size(scoremap.shape)
    return _image(scoremap, np.asarray(thresholds, np.float64), np.asarray(gt, np.int64).reshape(-1, 4),
                  multi_contour, np.asarray(deltas, np.float64), *_workspace(scoremap.shape))


@njit(cache=True, nogil=True)
def _image(scoremap, thresholds, gt, multi_contour, deltas, parent, added, box, per_component):
    u, hist, rows, cols = uint8_profile(scoremap)
    height, width = u.shape
    n_tau = len(thresholds)
    umax = rows.max()
    t_int = np.empty(n_tau, np.int64)
    for i in range(n_tau):
        t_int[i] = np.int64(thresholds[i] * np.float64(umax))  # int(τ · max u), τ ≥ 0
    above = np.zeros(257, np.int64)  # above[v]: the pixels ≥ v, i.e. above v − 1
    for v in range(255, -1, -1):
        above[v] = above[v + 1] + hist[v]
    # the box of all pixels above v: the first and last rows and columns whose max exceeds v
    top, bottom = _first_above(rows), _first_above(rows[::-1])
    left, right = _first_above(cols), _first_above(cols[::-1])
    e_box = np.empty((n_tau, 4), np.int64)
    out = np.full(n_tau, -1.0)
    # τs leaving the same number of pixels above them leave the same (nested) mask: one level each
    level_of = np.full(n_tau, -1, np.int64)
    order = np.argsort(t_int, kind="mergesort")
    ts = np.empty(n_tau, np.int64)
    n_levels = 0
    previous = -1
    for i in order:
        t = min(t_int[i], 255)
        count = above[t + 1]
        x0, y0, x1, y1 = left[t], top[t], width - 1 - right[t], height - 1 - bottom[t]
        e_box[i, 0], e_box[i, 1], e_box[i, 2], e_box[i, 3] = x0, y0, x1, y1
        if count == 0:  # no contour: the box is [0, 0, 0, 0]
            out[i] = _best_iou(0, 0, 0, 0, gt)
            continue
        # IoU(B, G) ≤ |E ∩ G| / |G| for every contour box B inside E: skip when below the smallest δ
        cover = _best_cover(x0, y0, min(x1 + 1, width - 1), min(y1 + 1, height - 1), gt)
        if len(deltas) and cover < deltas[0] * (1 - 1e-9):
            continue
        if count != previous:
            ts[n_levels] = t_int[i]
            n_levels += 1
            previous = count
        level_of[i] = n_levels - 1
    best = _levels(u, ts[:n_levels], gt, multi_contour, deltas, parent, added, box, per_component)
    for i in range(n_tau):
        if level_of[i] >= 0:
            out[i] = best[level_of[i]]
    return out, t_int, e_box, u


@njit(cache=True, nogil=True)
def _first_above(profile: np.ndarray) -> np.ndarray:
    """For each v in 0..255: the first index i with profile[i] > v (len(profile) when none)."""
    out = np.full(256, len(profile), np.int64)
    reached = 0  # the values below ``reached`` have their answer already
    for i in range(len(profile)):
        while reached < profile[i]:
            out[reached] = i
            reached += 1
    return out


@njit(cache=True, nogil=True)
def _levels(u, ts, gt, multi_contour, deltas, parent, added, box, per_component):
    """level_best_iou, compiled: the foreground sweep, then (V2) the holes sweep where needed."""
    height, width = u.shape
    extent = np.array([width, height, -1, -1])  # covers the components whose holes are needed
    best, open_ = _sweep(u, ts, gt, ALL if multi_contour else LARGEST, width - 1, height - 1, extent, deltas,
                         parent, added, box, per_component)
    if not multi_contour:
        for k in range(len(ts)):
            if open_[k]:
                best[k] = UNDECIDED
    elif open_.any():  # levels where a hole's box could beat the outer boxes: sweep the holes too
        # A hole is a 4-connected component of the pixels ≤ t that does not reach the frame. The holes
        # needed lie inside ``extent``: sweeping that crop finds them (a background component that
        # reaches the crop's edge is not one of them), coordinates shifted by the crop's corner.
        x0, y0, x1, y1 = extent
        crop = u[y0:y1 + 1, x0:x1 + 1]
        shifted = gt - np.array([x0, y0, x0, y0])
        holes, _ = _sweep(crop, ts[open_], shifted, HOLES, width - 1 - x0, height - 1 - y0, extent, deltas,
                          parent, added, box, per_component)
        best[open_] = np.maximum(best[open_], holes)
    return best


@njit(cache=True, nogil=True)
def _best_cover(x0: int, y0: int, x1: int, y1: int, gt: np.ndarray) -> float:
    """Max over the GT boxes of |box ∩ G| / |G|: no box inside this one can have a higher IoU with G."""
    best = 0.0
    for g in range(gt.shape[0]):
        inter, area_g = _overlap(x0, y0, x1, y1, gt, g)
        best = max(best, inter / area_g)
    return best


@njit(cache=True, nogil=True)
def _sweep(u, ts, gt, mode, x_max, y_max, extent, deltas, parent, added, box, per_component):
    """Add the pixels of ``u`` highest first, joining each to its 8-connected added neighbours (the
    components of u > t), or for HOLES lowest first and 4-connected (the components of u ≤ t); once
    the set of a threshold t in ``ts`` is complete, score its boxes (``_snapshot``; boxes are clipped
    to ``x_max``, ``y_max``)."""
    height, width = u.shape
    wp = width + 2  # a padded grid: the 1-pixel frame is never added, so neighbours need no bounds checks
    n = (height + 2) * wp
    offsets = (-wp - 1, -wp, -wp + 1, 1, wp + 1, wp, wp - 1, -1)  # _NEIGHBOURS on the padded grid
    descending = mode != HOLES
    runs = _RUNS8 if descending else _RUNS4
    # Band j holds the pixels that join between the (j−1)-th and the j-th snapshot: descending, those
    # above ts[K−1−j] but not above ts[K−j]; ascending, those ≤ ts[j] but not ≤ ts[j−1]. Band K: never
    # needed. Pixels are sorted by band (counting sort), in raster order within a band.
    n_ts = len(ts)
    band_of = np.empty(256, np.int64)
    for v in range(256):
        j = 0
        if descending:
            while j < n_ts and v <= ts[n_ts - 1 - j]:
                j += 1
        else:
            while j < n_ts and v > ts[j]:
                j += 1
        band_of[v] = j
    end = np.zeros(n_ts + 2, np.int64)
    for y in range(height):
        for x in range(width):
            end[band_of[u[y, x]] + 1] += 1
    for j in range(n_ts + 1):
        end[j + 1] += end[j]
    # the workspace (_workspace): per component (numbered as they appear, so their rows stay compact)
    # its box (x0, y0, x1, y1), 2 × its outer contour's area if it has no hole, 4 × its Euler number,
    # its size, its first pixel in raster order (y · width + x), its position in ``live`` (the current
    # components, unordered); and the pixels in sweep order (y << 16 | x)
    area2, euler4, size, first, live, slot, order = per_component
    for y in range(height):
        for x in range(width):
            j = band_of[u[y, x]]
            if j < n_ts:
                order[end[j]] = y << 16 | x  # (end[j] ends as the end of band j)
                end[j] += 1

    # parent[p]: −1 not added yet; ≥ 0 the next pixel towards the root; ≤ −2 p is the root of
    # component −2 − parent[p]
    parent[:n] = -1
    added[:n] = 0  # parent != −1, small enough to stay in the L1 cache
    n_live = 0
    n_made = 0

    out = np.empty(len(ts), np.float64)
    open_ = np.zeros(len(ts), np.bool_)
    i = 0
    # the previous pixel (y << 16 | x), its neighbourhood mask, its root and its component
    prev, prev_mask, r, c = -2, 0, -1, -1
    for band in range(n_ts):
        while i < end[band]:
            e = order[i]
            y = e >> 16
            x = e & 0xFFFF
            p = (y + 1) * wp + x + 1
            i += 1
            run = e == prev + 1  # it is right of the previous pixel: its mask shifts by one column
            if run:
                mask = (prev_mask >> 1 & 0b11 | prev_mask << 1 & 0b1100000 | 0b10000000
                        | added[p - wp + 1] << 2 | added[p + 1] << 3 | added[p + wp + 1] << 4)
            else:
                mask = 0
                for j in range(len(offsets)):
                    mask |= added[p + offsets[j]] << j
            added[p] = 1
            prev, prev_mask = e, mask
            if run and runs[mask, 0] == 1:
                # its added neighbours are one group, holding the previous pixel: that pixel's component
                # (r, c), in the same row, one column to the left
                parent[p] = r
                box[c, 2] = max(box[c, 2], x)
            else:
                r = -1  # the pixel's root: the first neighbour's, the others' merged into it
                for j in range(1, 1 + runs[mask, 0]):
                    a = _root(parent, p + offsets[runs[mask, j]])
                    if r < 0:
                        r = a
                        continue
                    if a == r:
                        continue
                    if size[-2 - parent[r]] < size[-2 - parent[a]]:  # the smaller joins the larger
                        r, a = a, r
                    c, d = -2 - parent[r], -2 - parent[a]  # merge component d into c
                    parent[a] = r
                    size[c] += size[d]
                    box[c, 0] = min(box[c, 0], box[d, 0])
                    box[c, 1] = min(box[c, 1], box[d, 1])
                    box[c, 2] = max(box[c, 2], box[d, 2])
                    box[c, 3] = max(box[c, 3], box[d, 3])
                    area2[c] += area2[d]
                    first[c] = min(first[c], first[d])
                    euler4[c] += euler4[d]
                    last = live[n_live - 1]  # remove d (swap it with the last live component)
                    live[slot[d]] = last
                    slot[last] = slot[d]
                    n_live -= 1
                if r < 0:  # a new component
                    c = n_made
                    n_made += 1
                    parent[p] = -2 - c
                    r = p
                    box[c, 0] = x
                    box[c, 1] = y
                    box[c, 2] = x
                    box[c, 3] = y
                    area2[c] = 0
                    euler4[c] = 0
                    size[c] = 0
                    first[c] = y * width + x
                    live[n_live] = c
                    slot[c] = n_live
                    n_live += 1
                else:
                    c = -2 - parent[r]
                    parent[p] = r
                    box[c, 0] = min(box[c, 0], x)
                    box[c, 1] = min(box[c, 1], y)
                    box[c, 2] = max(box[c, 2], x)
                    box[c, 3] = max(box[c, 3], y)
                    if mode == LARGEST:
                        first[c] = min(first[c], y * width + x)
            size[c] += 1
            if descending:  # area and Euler number of the 8-connected components
                area2[c] += _CELLS[mask, 0]
                euler4[c] += _CELLS[mask, 1]
        k = n_ts - 1 - band if descending else band  # the set is now u > ts[k] (descending) or u ≤ ts[k]
        out[k], open_[k] = _snapshot(live, n_live, box, area2, euler4, first, size, gt, height, width, x_max,
                                     y_max, extent, deltas, mode)
    return out, open_


@njit(cache=True, nogil=True)
def _snapshot(live, n_live, box, area2, euler4, first, size, gt, height, width, x_max, y_max, extent, deltas,
              mode):
    """(best IoU, undecided) of one level's boxes.

    ALL: every component's box; undecided when a component with a hole has a box overlapping a GT
    box enough that the box of one of its holes (which lies inside it) could score higher:
    IoU(H, G) ≤ |C ∩ G| / |G|; given IoU thresholds ``deltas``, only if it could also reach the next
    one above the level's best (else the best stays in the same interval between thresholds).
    HOLES: every hole's box (−1 if none): a hole's contour runs through the pixels around it, one
    pixel outside its own box. LARGEST: the box of the component with the largest outer-contour area;
    undecided when a component with a hole could change the choice (it encloses more than its own
    cells: its area is only known to lie between theirs and its bounding box's, and the components
    inside its holes are listed out of raster order)."""
    if mode == HOLES:
        best = -1.0
        for j in range(n_live):
            c = live[j]
            x0, y0, x1, y1 = box[c, 0], box[c, 1], box[c, 2], box[c, 3]
            if x0 == 0 or y0 == 0 or x1 == width - 1 or y1 == height - 1:
                continue  # it reaches the frame: background, not a hole
            best = max(best, _best_iou(x0 - 1, y0 - 1, min(x1 + 2, x_max), min(y1 + 2, y_max), gt))
        return best, False
    if mode == ALL:
        best = -1.0
        for j in range(n_live):
            c = live[j]
            best = max(best, _best_iou(box[c, 0], box[c, 1], min(box[c, 2] + 1, x_max),
                                       min(box[c, 3] + 1, y_max), gt))
        # the cover a holed component needs for its holes to matter: above the best (exact values), or
        # with IoU thresholds reaching the next one the level has not (none left: never)
        bar = best
        if len(deltas):
            bar = np.inf
            for d in deltas:
                if d > best:
                    bar = max(best, d - 1e-12)
                    break
        undecided = False
        for j in range(n_live):
            c = live[j]
            if euler4[c] != 4 and _best_cover(box[c, 0], box[c, 1], min(box[c, 2] + 1, x_max),
                                              min(box[c, 3] + 1, y_max), gt) > bar:
                undecided = True  # its holes are needed: they lie inside its box, which ``extent`` covers
                extent[0] = min(extent[0], box[c, 0])
                extent[1] = min(extent[1], box[c, 1])
                extent[2] = max(extent[2], box[c, 2])
                extent[3] = max(extent[3], box[c, 3])
        return best, undecided
    # OpenCV lists the outer contours of the components that are not inside a hole from the last-found
    # (in raster order of their first pixel) to the first, and max() keeps the first of equal areas
    top = -1
    any_hole = False
    for j in range(n_live):
        c = live[j]
        any_hole |= euler4[c] != 4
        if top < 0 or area2[c] > area2[top] or (area2[c] == area2[top] and first[c] > first[top]):
            top = c
    for j in range(n_live):
        c = live[j]
        if not any_hole or c == top:
            continue
        upper = area2[c]
        if euler4[c] != 4:  # each hole pixel completes ≤ 4 cells by ≤ 1 half; the polygon is in the box
            w, h = box[c, 2] - box[c, 0], box[c, 3] - box[c, 1]
            upper = min(2 * w * h, area2[c] + 4 * ((w + 1) * (h + 1) - size[c]))
        if upper >= area2[top]:
            return UNDECIDED, True
    return _best_iou(box[top, 0], box[top, 1], min(box[top, 2] + 1, x_max), min(box[top, 3] + 1, y_max),
                     gt), False
