"""Dataset loading and synthetic-world speed.

    python bench/datasets_bench.py [--fixtures ../shared/fixtures] [--n 1000] [--json out.json]

Measures (wall and CPU seconds, best of --repeat):
  * building the index of the 50,000-image ILSVRC test split from the wsolevaluation metadata
    (parse 4 files, 80,477 boxes, 50k Sample objects) — the acceptance target is "well under a few seconds";
  * the same for CUB test and OpenImages test;
  * render_scene throughput at 128×128 (single- and multi-object; target >= 200 scenes/s on one core);
  * make_synthetic of --n images in the wsol and voc formats (target: 1,000 images in seconds).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _timed(fn, repeat: int):
    best_wall = best_cpu = float("inf")
    out = None
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        best_wall = min(best_wall, time.perf_counter() - w)
        best_cpu = min(best_cpu, time.process_time() - c)
    return out, best_wall, best_cpu


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", type=Path, default=REPO.parent / "shared" / "fixtures")
    ap.add_argument("--n", type=int, default=1000, help="images for the make_synthetic timing")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from wsolbench.datasets import synthetic as syn
    from wsolbench.datasets.cub import CUB200
    from wsolbench.datasets.ilsvrc import ILSVRC
    from wsolbench.datasets.openimages import OpenImages30k

    results: dict = {}
    meta = args.fixtures / "wsolevaluation-metadata"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if meta.is_dir():
            for name, cls, sub in (("ilsvrc_test_index", ILSVRC, "ILSVRC"), ("cub_test_index", CUB200, "CUB"),
                                   ("openimages_test_index", OpenImages30k, "OpenImages")):
                ds, wall, cpu = _timed(lambda: cls(root, "test", metadata_dir=meta / sub), args.repeat)
                results[name] = {"images": len(ds), "wall_s": round(wall, 3), "cpu_s": round(cpu, 3)}
        else:
            print(f"fixtures not found at {args.fixtures}; skipping the metadata index timings", file=sys.stderr)

        syn.render_scene(0)
        for label, kw in (("render_single_128", {}), ("render_multi_128", {"n_objects": (1, 4)})):
            n = 300
            _, wall, cpu = _timed(lambda: [syn.render_scene(i, size=(128, 128), **kw) for i in range(n)], 1)
            results[label] = {"scenes_per_s_wall": round(n / wall, 1), "scenes_per_s_cpu": round(n / cpu, 1)}

        for fmt in ("wsol", "voc"):
            _, wall, cpu = _timed(lambda: syn.make_synthetic(fmt, root / f"{fmt}-{time.time_ns()}", n=args.n), 1)
            results[f"make_synthetic_{fmt}_{args.n}"] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}

    try:
        import os

        results["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return results


if __name__ == "__main__":
    main()
