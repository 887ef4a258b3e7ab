"""Harness throughput: images/s of ``wsolbench run`` against a plain sequential loop, and its overhead.

Writes the synthetic CUB world at real photo size (W and H drawn from 375..500 px, JPEG), then measures in
one run (figures are ratios, so a shared machine's speed cancels out as far as it can):

* the plain loop: decode → ``evaluator.process`` (map + every metric) → next batch, one thread;
* the harness with the zero-cost ``center`` method: 1 process with 0 and 2 decoding workers, and 2 processes
  (``torchrun``, gloo) with 0 and 2 workers each (eval time from ``metrics.json``, start-up excluded);
* the harness around a fake method that costs a fixed 5 ms per image and releases the GIL (a GPU model's
  stand-in): its eval time over N × 5 ms − 1 is the overhead the harness adds.

Targets (issue #23): harness with 2 workers ≥ 1.8× the plain loop on a 2-core machine; overhead ≤ 10 %.

    nice -n 10 python bench/harness_bench.py [--n 200] [--root /tmp/harness-bench]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from wsolbench import harness
from wsolbench.harness import RunSpec, run

BIN = Path(sys.executable).parent
BATCH = 16  # configs/harness.yaml's batch size
FAKE_COST_S = 0.005  # per image


@contextmanager
def fixed_cost_center():
    """``center`` made to cost a fixed 5 ms per image of waiting that releases the GIL, like a GPU call."""
    from wsolbench.methods.baselines import CenterPrior

    real = CenterPrior.localize

    @functools.wraps(real)
    def slow(self, images, *args, **kwargs):
        time.sleep(FAKE_COST_S * len(images))
        return real(self, images, *args, **kwargs)

    CenterPrior.localize = slow
    try:
        yield
    finally:
        CenterPrior.localize = real


@contextmanager
def no_map_files():
    """A diagnostic: the harness without its per-image map PNGs (``records.save_map`` made a no-op), to
    tell the pipeline's own cost from the records' (the run's numbers do not depend on them)."""
    from wsolbench import records

    real = records.save_map
    records.save_map = lambda path, u8: None
    try:
        yield
    finally:
        records.save_map = real


def write_world(root: Path, n: int) -> Path:
    """The synthetic CUB world with ``n`` test images of 375..500 px a side (reused when already there)."""
    from wsolbench.datasets.synthetic import MANIFEST, make_synthetic

    data = root / f"cub-{n}"
    if not (data / MANIFEST).exists():
        shutil.rmtree(data, ignore_errors=True)
        make_synthetic("cub", data, counts={"train": 10, "val": 10, "test": n}, size_range=(375, 500))
    return data


def plain_loop(method_name: str, data: Path, n: int) -> float:
    """Images/s of decode → map → metrics, one batch after the other, no shards (the harness's own
    evaluator does the scoring, so both sides do the same work)."""
    from wsolbench.config import load_harness_config, load_method_config
    from wsolbench.registry import create_dataset, get_method_class

    hcfg = load_harness_config([])
    dataset = create_dataset("cub", root=data, split="test").subset(range(n))
    method = get_method_class(method_name).from_config(load_method_config(method_name, "tiny", "cub", []),
                                                       class_names=dataset.class_names)
    evaluator = _evaluator(hcfg, dataset, method)
    t0, c0 = time.perf_counter(), cpu_seconds()
    for start in range(0, n, BATCH):
        samples = [dataset[i] for i in range(start, min(n, start + BATCH))]
        images = [s.load_image() for s in samples]
        batch, _ = evaluator.process(samples, images)
        evaluator.absorb(batch)
    CPU_MS[("plain", len(os.sched_getaffinity(0)))] = 1000 * (cpu_seconds() - c0) / n
    return n / (time.perf_counter() - t0)


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the decoding workers), user + system."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


CPU_MS: dict = {}  # CPU ms per image of the in-process measurements: contention-proof, unlike images/s


def _evaluator(hcfg: dict, dataset, method):
    """The box evaluator the harness builds for (cub, method), through whichever constructor it has now."""
    import inspect

    from wsolbench.protocols import get_protocol

    cls = harness.evaluator_class("boxes", get_protocol("wsolevaluation")) \
        if hasattr(harness, "evaluator_class") else harness.EVALUATORS["boxes"]
    args = [hcfg, dataset, method]
    if "protocol" in inspect.signature(cls.__init__).parameters:
        args.append(get_protocol("wsolevaluation"))
    return cls(*args)


def harness_rate(data: Path, n: int, out: Path, run_id: str, workers: int, nproc: int) -> float:
    """Images/s of the harness's evaluation of ``center`` (``eval_images_per_s`` of metrics.json)."""
    if nproc == 1:
        c0 = cpu_seconds()
        rec = run(RunSpec(method="center", dataset="cub", data_root=data, profile="tiny", limit=n, out=out,
                          run_id=run_id, progress=False, workers=workers)).record
        CPU_MS[run_id] = 1000 * (cpu_seconds() - c0) / n  # the whole run: evaluation and its records
    else:
        args = ["--method", "center", "--dataset", "cub", "--data-root", str(data), "--profile", "tiny",
                "--limit", str(n), "--workers", str(workers), "--out", str(out), "--run-id", run_id, "--quiet"]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        subprocess.run([str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", "--no-python",
                        str(BIN / "wsolbench"), "run", *args], check=True, env=env, capture_output=True)
        rec = json.loads((out / run_id / "metrics.json").read_text())
    return float(rec["eval_images_per_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=192, help="test images (a multiple of 16 keeps batches full)")
    ap.add_argument("--root", type=Path, default=Path("/tmp/harness-bench"))
    a = ap.parse_args()
    data = write_world(a.root, a.n)
    out = a.root / "runs"
    shutil.rmtree(out, ignore_errors=True)

    harness_rate(data, min(a.n, 32), out, "warm-up", 0, 1)  # imports, numba compilation, page cache
    plain = plain_loop("center", data, a.n)
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cores)})  # the same loop on one core: what the 2 cores are measured against
    try:
        one_core = plain_loop("center", data, a.n)
    finally:
        os.sched_setaffinity(0, cores)
    rates = {(nproc, w): harness_rate(data, a.n, out, f"center-p{nproc}-w{w}", w, nproc)
             for nproc in (1, 2) for w in (0, 2)}
    with fixed_cost_center():
        fake = harness_rate(data, a.n, out, "fixed-cost", 2, 1)
    with no_map_files():
        bare = {w: harness_rate(data, a.n, out, f"center-bare-w{w}", w, 1) for w in (0, 2)}
        with fixed_cost_center():
            fake_bare = harness_rate(data, a.n, out, "fixed-cost-bare", 0, 1)

    print(f"cores: {len(cores)}, images: {a.n} (375..500 px JPEG), batch {BATCH}")
    print(f"plain loop (decode -> map -> metric), one core:      {one_core:7.1f} img/s   "
          f"{one_core / plain:.2f}x")
    print(f"plain loop (decode -> map -> metric), all cores:     {plain:7.1f} img/s   1.00x   "
          "(MaxBoxAcc's own threads)")
    for (nproc, w), r in rates.items():
        print(f"harness, center, {nproc} process(es), {w} workers each:  {r:7.1f} img/s   {r / plain:.2f}x   "
              f"({r / one_core:.2f}x the one-core loop)")
    for w, r in bare.items():
        print(f"harness, center, 1 process, {w} workers, no map PNGs: {r:7.1f} img/s   {r / plain:.2f}x   "
              f"(CPU {CPU_MS[f'center-bare-w{w}']:.1f} ms/image)")
    print(f"CPU per image: plain loop {CPU_MS[('plain', len(cores))]:.1f} ms, harness (1 process) "
          f"{CPU_MS['center-p1-w0']:.1f} ms with 0 workers, {CPU_MS['center-p1-w2']:.1f} ms with 2 (shards, "
          "per-image records and maps included)")
    print(f"-> 1 process + 2 workers: {rates[(1, 2)] / plain:.2f}x the plain loop, "
          f"best harness setting: {max(rates.values()) / plain:.2f}x (target >= 1.8x)")
    model_s = a.n * FAKE_COST_S
    fake_s = a.n / fake
    print(f"fixed 5 ms/image method, 1 process, 2 workers:    {fake:7.1f} img/s; its model time {model_s:.2f} s, "
          f"the harness's eval {fake_s:.2f} s -> overhead over the model {fake_s / model_s - 1:+.0%} "
          "(target <= 10%)")
    print(f"   without the map PNGs (0 workers): {fake_bare:7.1f} img/s, eval {a.n / fake_bare:.2f} s -> overhead "
          f"{a.n / fake_bare / model_s - 1:+.0%}; the zero-cost center took {a.n / bare[0]:.2f} s there, so "
          f"{(a.n / bare[0] + model_s - a.n / fake_bare) / model_s:.0%} of the model's time was hidden behind "
          "decoding and scoring")


if __name__ == "__main__":
    main()
