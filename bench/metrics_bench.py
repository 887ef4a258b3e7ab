"""Speed and exactness of the metric engine against a straightforward reference loop.

    python bench/metrics_bench.py              # 5,000 synthetic 224×224 maps (takes several minutes)
    python bench/metrics_bench.py --n 500      # quicker

For every configuration (MaxBoxAcc v1 / V2 at cam_curve_interval 0.01 and 0.001, PxAP) the same maps
go through

- the reference: the wsolevaluation algorithm written out plainly — per image and per τ, cv2.threshold,
  cv2.findContours, max(contours, key=cv2.contourArea) / every contour, cv2.boundingRect, then one IoU
  matrix per image; for PxAP one np.histogram per image for foreground and one for background;
- wsolbench.metrics (MaxBoxAcc / PxAP, ``--workers`` threads),

and the bench checks that the accumulated states (counts per δ and τ, histograms) and the final numbers
are IDENTICAL, then prints images/second and the speed ratio. Maps are generated in chunks, so memory
stays bounded whatever ``--n`` is; generation is not timed.

Synthetic maps look like CAMs: 1–3 Gaussian blobs plus weak noise on a 7×7, 14×14 or 28×28 grid,
upsampled bicubically to 224×224 and min-max normalised (``prepare_map``). The GT box is the blob's
half-maximum box jittered by up to ±20 px (sometimes a second box), the GT mask for PxAP is the
blob above a jittered level.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
try:
    from wsolbench.metrics import MaxBoxAcc, PxAP, prepare_map
except ImportError:  # running from a checkout without installing
    raise SystemExit("install the package first: pip install -e .")


# --------------------------------------------------------------------------- synthetic data
def synth(rng: np.random.Generator, size: int = 224):
    g = int(rng.choice([7, 14, 28]))
    yy, xx = np.mgrid[0:g, 0:g] / g
    low = np.zeros((g, g))
    for _ in range(int(rng.integers(1, 4))):
        cx, cy = rng.random(2)
        sx, sy = 0.05 + 0.25 * rng.random(2)
        low += rng.random() * np.exp(-((xx - cx) ** 2 / (2 * sx ** 2) + (yy - cy) ** 2 / (2 * sy ** 2)))
    low += 0.3 * rng.random((g, g)) ** 2
    m = prepare_map(low, (size, size))
    fg = m > 0.5
    ys, xs = np.nonzero(fg)
    boxes = []
    for _ in range(1 if rng.random() < 0.8 else 2):
        j = rng.integers(-20, 21, 4)
        b = np.clip([xs.min() + j[0], ys.min() + j[1], xs.max() + j[2], ys.max() + j[3]], 0, size - 1)
        boxes.append([min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3])])
    mask = m > 0.5 + 0.2 * (rng.random() - 0.5)
    if not mask.any():
        mask[np.unravel_index(np.argmax(m), m.shape)] = True
    return m, np.asarray(boxes, np.int64), mask


def chunks(n: int, chunk: int, seed: int, size: int):
    for start in range(0, n, chunk):
        maps, boxes, masks = [], [], []
        for i in range(start, min(n, start + chunk)):
            m, b, k = synth(np.random.default_rng([seed, i]), size)
            maps.append(m)
            boxes.append(b)
            masks.append(k)
        yield maps, boxes, masks


# --------------------------------------------------------------------------- the reference loops
def reference_box_counts(maps, gt_boxes, interval, multi_contour, deltas=(30, 50, 70)):
    thresholds = list(np.arange(0, 1, interval))
    num_correct = np.zeros((len(deltas), len(thresholds)), np.int64)
    for scoremap, gt in zip(maps, gt_boxes):
        scoremap = scoremap.astype(np.float64)  # the reference accepts float64 maps only
        height, width = scoremap.shape
        image = np.expand_dims((scoremap * 255).astype(np.uint8), 2)
        boxes_at_thr, n_boxes = [], []
        for tau in thresholds:
            _, binary = cv2.threshold(image, int(tau * np.max(image)), 255, cv2.THRESH_BINARY)
            contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
            if len(contours) == 0:
                boxes_at_thr.append(np.asarray([[0, 0, 0, 0]]))
                n_boxes.append(1)
                continue
            if not multi_contour:
                contours = [max(contours, key=cv2.contourArea)]
            boxes = []
            for contour in contours:
                x, y, w, h = cv2.boundingRect(contour)
                boxes.append([x, y, min(x + w, width - 1), min(y + h, height - 1)])
            boxes_at_thr.append(np.asarray(boxes))
            n_boxes.append(len(contours))
        a = np.concatenate(boxes_at_thr, axis=0)
        b = np.asarray(gt)
        min_x = np.maximum(a[:, None, 0], b[None, :, 0])
        min_y = np.maximum(a[:, None, 1], b[None, :, 1])
        max_x = np.minimum(a[:, None, 2], b[None, :, 2])
        max_y = np.minimum(a[:, None, 3], b[None, :, 3])
        inter = np.maximum(0, max_x - min_x + 1) * np.maximum(0, max_y - min_y + 1)
        area_a = ((a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1))[:, None]
        area_b = ((b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1))[None, :]
        den = area_a + area_b - inter
        degenerate = np.where(den <= 0)
        den[degenerate] = 1
        ious = inter / den
        ious[degenerate] = 0
        best_box = ious.max(1)
        idx, per_thr = 0, []
        for n in n_boxes:
            per_thr.append(max(best_box[idx:idx + n]))
            idx += n
        for j, d in enumerate(deltas):
            num_correct[j][np.where(np.asarray(per_thr) >= d / 100)[0]] += 1
    return num_correct


def reference_pxap_hists(maps, masks, interval):
    edges = np.append(list(np.arange(0, 1, interval)), [1.0, 2.0, 3.0])
    fg_hist = np.zeros(len(edges) - 1)
    bg_hist = np.zeros(len(edges) - 1)
    for m, fg in zip(maps, masks):
        m = m.astype(np.float64)
        fg_hist += np.histogram(m[fg], bins=edges)[0]
        bg_hist += np.histogram(m[~fg], bins=edges)[0]
    return fg_hist, bg_hist


def reference_pxap(fg_hist, bg_hist):
    tp = fg_hist[::-1].cumsum()
    fn = fg_hist.sum() - tp
    fp = bg_hist[::-1].cumsum()
    nz = (tp + fp) != 0
    with np.errstate(invalid="ignore"):
        precision = tp / (tp + fp)
        recall = tp / (tp + fn)
    return (precision[1:] * np.diff(recall))[nz[1:]].sum() * 100


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=5000, help="number of synthetic maps (default 5000)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--chunk", type=int, default=250, help="maps generated (and held) at a time")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="threads for the fast path (default: all cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="*", default=None,
                    help="subset of configurations: v1-0.01 v2-0.01 v1-0.001 v2-0.001 pxap-0.01 pxap-0.001")
    args = ap.parse_args(argv)
    cv2.setNumThreads(1)

    # one-time costs, kept out of the per-image figures: numba loads (or, on a fresh install, compiles)
    # the component-tree kernel at the first call in a process
    t0 = time.perf_counter()
    warm_maps, warm_boxes, _ = next(chunks(2, 2, args.seed + 1, args.size))
    for multi in (False, True):
        MaxBoxAcc(cam_curve_interval=0.01, multi_contour=multi, workers=1).update(warm_maps, warm_boxes)
    print(f"one-time kernel load/compile: {time.perf_counter() - t0:.2f} s (not counted below)")

    configs = [("v1-0.01", "box", 0.01, False), ("v2-0.01", "box", 0.01, True),
               ("v1-0.001", "box", 0.001, False), ("v2-0.001", "box", 0.001, True),
               ("pxap-0.01", "mask", 0.01, None), ("pxap-0.001", "mask", 0.001, None)]
    if args.only:
        configs = [c for c in configs if c[0] in args.only]
    print(f"{args.n} synthetic {args.size}×{args.size} maps, fast path with {args.workers} thread(s), "
          f"OpenCV {cv2.__version__}, {os.cpu_count()} CPU(s)")
    print(f"{'config':<11} {'reference img/s':>16} {'wsolbench img/s':>16} {'ratio':>7}  identical  result")
    all_same = True
    for name, kind, interval, multi in configs:
        t_ref = t_fast = 0.0
        if kind == "box":
            metric = MaxBoxAcc(cam_curve_interval=interval, multi_contour=multi, workers=args.workers)
            ref_counts = None
        else:
            metric = PxAP(cam_curve_interval=interval)
            ref_fg = ref_bg = None
        for maps, boxes, masks in chunks(args.n, args.chunk, args.seed, args.size):
            t0 = time.perf_counter()
            if kind == "box":
                c = reference_box_counts(maps, boxes, interval, multi)
                ref_counts = c if ref_counts is None else ref_counts + c
            else:
                f, b = reference_pxap_hists(maps, masks, interval)
                ref_fg = f if ref_fg is None else ref_fg + f
                ref_bg = b if ref_bg is None else ref_bg + b
            t1 = time.perf_counter()
            if kind == "box":
                metric.update(maps, boxes)
            else:
                metric.update(maps, masks)
            t2 = time.perf_counter()
            t_ref += t1 - t0
            t_fast += t2 - t1
        res = metric.compute()
        if kind == "box":
            state = metric.state_dict()["num_correct"]
            ref_acc = [float((ref_counts[j] * 100. / float(args.n)).max()) for j in range(3)]
            same = np.array_equal(state, ref_counts) and ref_acc == [res["maxboxacc_iou30"],
                                                                    res["maxboxacc_iou50"], res["maxboxacc_iou70"]]
            shown = f"MaxBoxAcc {res['maxboxacc']:.2f}  V2 {res['maxboxacc_v2']:.2f}"
        else:
            st = metric.state_dict()
            same = (np.array_equal(st["fg_hist"], ref_fg) and np.array_equal(st["bg_hist"], ref_bg)
                    and reference_pxap(ref_fg, ref_bg) == res["pxap"])
            shown = f"PxAP {res['pxap']:.2f}  pIoU {res['piou']:.2f}"
        all_same &= same
        print(f"{name:<11} {args.n / t_ref:>16.1f} {args.n / t_fast:>16.1f} {t_ref / t_fast:>6.2f}×  "
              f"{'yes' if same else 'NO':<9}  {shown}", flush=True)
    if not all_same:
        print("MISMATCH: the fast path disagrees with the reference loop", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
