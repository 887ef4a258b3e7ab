"""Harness throughput: images/s of ``wsolbench run`` against a plain sequential loop, and its overhead.

Writes the synthetic CUB world at real photo size (W and H drawn from 375..500 px, JPEG), then measures in
one run (figures are ratios, so a shared machine's speed cancels out as far as it can):

* the sequential loop (the issue's baseline): decode → ``evaluator.process`` (map + every metric) → next
  batch, in a process of its own that runs ONE thread: ``torch.set_num_threads(1)``, ``cv2.setNumThreads(1)``,
  ``numba.set_num_threads(1)``, MaxBoxAcc's image threads off. The same loop with the libraries' default
  threads is printed too. Both write no map PNGs and no shards (the harness does);
* the cores' ceiling: one such loop per core, all started together, all their images over the wall time from
  the first start to the last end (shared caches, memory bandwidth and a VM's vCPUs can give less than
  ``cores`` × one loop);
* the harness with the zero-cost ``center`` method: 1 process with 0 and 2 decoding workers, and 2 processes
  (``torchrun``, gloo) with 0 and 2 workers each (eval time from ``metrics.json``, start-up excluded);
* the CPU per image of each stage of the harness (1 process, 0 workers: every stage runs in this process);
* the harness around a fake method that waits a fixed 5 ms per image without using the CPU
  (``time.sleep``, as a CUDA call waits for the GPU): its eval time over N × 5 ms − 1 is the overhead the
  harness adds on top of the model; also over the last N/2 images only (without the start and the tail),
  and with 15 ms per image (a model slower than the scoring: what the overlap hides when CPU is not short).

Targets (issue #23): harness with 2 workers ≥ 1.8× the sequential loop on a 2-core machine; overhead ≤ 10 %.
The load average is printed before and after: other work on the machine takes cores from the harness.

    nice -n 10 python bench/harness_bench.py [--n 192] [--root /tmp/harness-bench]
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
import threading
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from wsolbench import harness
from wsolbench.harness import RunSpec, run

BATCH = 16  # configs/harness.yaml's batch size
FAKE_COST_S = 0.005  # per image
SLOW_COST_S = 0.015  # per image: a model slower than the scoring even on a loaded machine (a diagnostic)


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the decoding workers), user + system."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


@contextmanager
def patched(owner: Any, name: str, make: Callable[[Any], Any]) -> Iterator[None]:
    """``owner.name`` replaced by ``make(original)`` within the block."""
    real = getattr(owner, name)
    setattr(owner, name, make(real))
    try:
        yield
    finally:
        setattr(owner, name, real)


def fixed_cost_center(cost_s: float = FAKE_COST_S):
    """``center`` made to wait a fixed ``cost_s`` per image without using the CPU, like a call into a GPU model."""
    from wsolbench.registry import get_method_class

    def make(real):
        @functools.wraps(real)
        def slow(self, images, *args, **kwargs):
            time.sleep(cost_s * len(images))
            return real(self, images, *args, **kwargs)
        return slow

    return patched(get_method_class("center"), "localize", make)


def write_world(root: Path, n: int) -> Path:
    """The synthetic CUB world with ``n`` test images of 375..500 px a side (reused when already there)."""
    from wsolbench.datasets.synthetic import MANIFEST, make_synthetic

    data = root / f"cub-{n}"
    if not (data / MANIFEST).exists():
        shutil.rmtree(data, ignore_errors=True)
        make_synthetic("cub", data, counts={"train": 10, "val": 10, "test": n}, size_range=(375, 500))
    return data


def one_thread() -> None:
    """Every library of the loop on one thread, in this process only (the sequential baseline)."""
    import cv2
    import numba
    import torch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    numba.set_num_threads(1)


def one_image_at_a_time(new_metrics: Callable[..., dict]) -> Callable[..., dict]:
    """``new_metrics`` (an evaluator's, bound or not) with MaxBoxAcc's image threads off (``workers=1``)."""
    @functools.wraps(new_metrics)
    def make(*args: Any) -> dict:
        mets = new_metrics(*args)
        for m in mets.values():
            if hasattr(m, "workers"):
                m.workers = 1
        return mets
    return make


def plain_loop(data: Path, n: int, sequential: bool) -> dict:
    """Images/s and CPU ms per image of decode → map → metrics, one batch after the other, no map PNGs and
    no shards (the harness's own evaluator scores, so both sides do the same scoring work)."""
    from wsolbench.config import load_harness_config, load_method_config
    from wsolbench.protocols import get_protocol
    from wsolbench.registry import create_dataset, get_method_class

    if sequential:
        one_thread()
    hcfg = load_harness_config([])
    dataset = create_dataset("cub", root=data, split="test").subset(range(n))
    method = get_method_class("center").from_config(load_method_config("center", "tiny", "cub", []),
                                                    class_names=dataset.class_names)
    protocol = get_protocol("wsolevaluation")
    evaluator = harness.evaluator_class("boxes", protocol)(hcfg, dataset, method, protocol)
    if sequential:
        evaluator.new_metrics = one_image_at_a_time(evaluator.new_metrics)

    def one_pass(stop: int) -> None:
        for start in range(0, stop, BATCH):
            samples = [dataset[i] for i in range(start, min(stop, start + BATCH))]
            images = [s.load_image() for s in samples]
            batch, _ = evaluator.process(samples, images)
            evaluator.absorb(batch)

    one_pass(2 * BATCH)  # untimed, as the harness's warm-up run: numba's cached kernels load, lazy imports
    start, t0, c0 = time.time(), time.perf_counter(), cpu_seconds()
    one_pass(n)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    return {"rate": n / wall, "cpu_ms": 1000 * cpu / n, "start": start, "end": start + wall}


def loops_in_children(data: Path, n: int, sequential: bool, k: int = 1) -> list[dict]:
    """``plain_loop`` in ``k`` fresh processes started together (one per core when ``k`` is the core count), so
    each one's thread settings stay there; their results in start order."""
    cmd = [sys.executable, __file__, "--loop", "sequential" if sequential else "all-cores", "--data", str(data),
           "--n", str(n)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(k)]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a plain loop failed in a child process: {' '.join(cmd)}")
    return [json.loads(o.strip().splitlines()[-1]) for o in outs]


def loops_at_once(data: Path, n: int, k: int) -> float:
    """Images/s of ``k`` sequential loops started together (one per core): k·n images over the wall time from
    the first timed pass's start to the last one's end. What this machine's cores give a perfectly parallel
    design of the same work (the ceiling of any harness here, whatever its code)."""
    runs = loops_in_children(data, n, sequential=True, k=k)
    return k * n / (max(r["end"] for r in runs) - min(r["start"] for r in runs))


class Stages:
    """CPU ms per image of each stage of the harness, timed with the calling thread's CPU clock (the
    stages run in threads of this process; with 0 workers decoding runs here too); a stage called inside
    another (PxAP and the PNGs inside the records) counts once, in the inner one."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = defaultdict(float)
        self.lock, self.local = threading.Lock(), threading.local()

    def timer(self, stage: str) -> Callable[[Any], Any]:
        def make(real):
            @functools.wraps(real)
            def timed(*args, **kwargs):
                outer, self.local.inner = getattr(self.local, "inner", None), 0.0
                t = time.thread_time()
                try:
                    return real(*args, **kwargs)
                finally:
                    took = time.thread_time() - t
                    with self.lock:
                        self.cpu[stage] += took - self.local.inner
                    self.local.inner = None if outer is None else outer + took
            return timed
        return make

    def patches(self) -> ExitStack:
        """Timers around the functions the box evaluator and the harness call, for one run."""
        import wsolbench.metrics as metrics
        from wsolbench import records
        from wsolbench.datasets.base import Sample
        from wsolbench.registry import get_method_class

        from wsolbench.protocols import get_protocol

        stack = ExitStack()  # MaxBoxAcc on the calling thread, so its kernel is timed as a stage of its own
        stack.enter_context(patched(harness.evaluator_class("boxes", get_protocol("wsolevaluation")), "new_metrics",
                                    one_image_at_a_time))
        for owner, name, stage in [
                (Sample, "load_image", "decode JPEG"), (Sample, "load_mask", "decode GT masks"),
                (get_method_class("center"), "localize", "model (center)"),
                (metrics, "prepare_map", "resize + normalise maps"),
                (metrics.MaxBoxAcc, "update", "MaxBoxAcc v1 + V2"), (metrics.PxAP, "image_histograms", "PxAP"),
                (records, "save_map", "map + GT PNGs"), (harness, "image_records", "per-image records"),
                (harness, "_write_shard", "shards (npz + records JSON)")]:
            stack.enter_context(patched(owner, name, self.timer(stage)))
        return stack

    def report(self, n: int, total_ms: float) -> str:
        ms = {k: 1000 * v / n for k, v in self.cpu.items()}
        ms["rest (pipeline, merge, threads)"] = total_ms - sum(ms.values())
        return ", ".join(f"{k} {v:.2f}" for k, v in ms.items())


def harness_rate(data: Path, n: int, out: Path, run_id: str, workers: int, nproc: int,
                 overrides: tuple[str, ...] = ()) -> dict:
    """Images/s of the harness's evaluation of ``center`` (``eval_images_per_s`` of metrics.json); for one
    process also the CPU ms per image of the evaluation and of ``records.finish`` after it."""
    if nproc > 1:
        args = ["--method", "center", "--dataset", "cub", "--data-root", str(data), "--profile", "tiny",
                "--limit", str(n), "--workers", str(workers), "--out", str(out), "--run-id", run_id, "--quiet",
                *[a for o in overrides for a in ("--set", o)]]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                        "-m", "wsolbench.cli", "run", *args], check=True, env=env, capture_output=True)
        return {"rate": float(json.loads((out / run_id / "metrics.json").read_text())["eval_images_per_s"])}
    spent: dict[str, float] = {}

    def clocked(key: str):
        def make(real):
            @functools.wraps(real)
            def f(*args, **kwargs):
                c0 = cpu_seconds()
                try:
                    return real(*args, **kwargs)
                finally:
                    spent[key] = 1000 * (cpu_seconds() - c0) / n
            return f
        return make

    with patched(harness, "_evaluate", clocked("eval_cpu_ms")), \
            patched(harness, "finish_records", clocked("finish_cpu_ms")):
        rec = run(RunSpec(method="center", dataset="cub", data_root=data, profile="tiny", limit=n, out=out,
                          run_id=run_id, progress=False, workers=workers, overrides=overrides)).record
    return {"rate": float(rec["eval_images_per_s"]), "eval_s": float(rec["eval_time_s"]), **spent}


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=192, help="test images (a multiple of 16 keeps batches full)")
    ap.add_argument("--root", type=Path, default=Path("/tmp/harness-bench"))
    ap.add_argument("--loop", choices=("sequential", "all-cores"), help=argparse.SUPPRESS)  # the child
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.loop:
        print(json.dumps(plain_loop(a.data, a.n, a.loop == "sequential")))
        return
    cores = len(os.sched_getaffinity(0))
    data = write_world(a.root, a.n)
    out = a.root / "runs"
    shutil.rmtree(out, ignore_errors=True)
    load_before = load()

    harness_rate(data, min(a.n, 32), out, "warm-up", 0, 1)  # imports, numba compilation, page cache
    seq, = loops_in_children(data, a.n, sequential=True)
    allc, = loops_in_children(data, a.n, sequential=False)
    at_once = loops_at_once(data, a.n, cores)
    rates = {(nproc, w): harness_rate(data, a.n, out, f"center-p{nproc}-w{w}", w, nproc)
             for nproc in (1, 2) for w in (0, 2)}
    no_maps = harness_rate(data, a.n, out, "center-nomaps-w2", 2, 1, ("harness.store_maps=false",))
    stages = Stages()
    with stages.patches():
        staged = harness_rate(data, a.n, out, "center-stages-w0", 0, 1)
    half = a.n // 2
    with fixed_cost_center():
        fake = {w: harness_rate(data, a.n, out, f"fixed-cost-w{w}", w, 1) for w in (2, 0)}
        fake_half = harness_rate(data, half, out, "fixed-cost-w2-half", 2, 1)
    with fixed_cost_center(SLOW_COST_S):
        slow = harness_rate(data, a.n, out, "slow-cost-w0", 0, 1)

    base = seq["rate"]
    print(f"machine: {cores} cores; load average {load_before} before, {load()} after (other sessions count)")
    print(f"images: {a.n} (375..500 px JPEG), batch {BATCH}, center (the zero-cost method)")
    print(f"sequential loop (decode -> map -> metric), 1 thread:      {base:7.1f} img/s   1.00x   "
          f"(CPU {seq['cpu_ms']:.2f} ms/image)")
    print(f"same loop, the libraries' default threads:                {allc['rate']:7.1f} img/s   "
          f"{allc['rate'] / base:.2f}x   (CPU {allc['cpu_ms']:.2f} ms/image)")
    print(f"{f'{cores} sequential loops at once (one per core):':58s}{at_once:7.1f} img/s   {at_once / base:.2f}x   "
          f"(the cores' ceiling for this work)")
    for (nproc, w), r in rates.items():
        cpu = f"   (CPU {r['eval_cpu_ms']:.2f} ms/image)" if "eval_cpu_ms" in r else ""
        what = f"harness, {nproc} process{'es' if nproc > 1 else ''}, {w} workers{' each' if nproc > 1 else ''}:"
        print(f"{what:58s}{r['rate']:7.1f} img/s   {r['rate'] / base:.2f}x{cpu}")
    print(f"harness, 1 process, 2 workers, store_maps=false:          {no_maps['rate']:7.1f} img/s   "
          f"{no_maps['rate'] / base:.2f}x   (CPU {no_maps['eval_cpu_ms']:.2f} ms/image)")
    print(f"-> 1 process + 2 workers: {rates[(1, 2)]['rate'] / base:.2f}x the sequential loop (target >= 1.8x); "
          f"{rates[(1, 2)]['rate'] / at_once:.0%} of the {cores} loops at once")
    bound = [cores * seq["cpu_ms"] / rates[(1, w)]["eval_cpu_ms"] for w in (0, 2)]
    print(f"   with the {cores} cores to itself, all busy ({cores} x the loop's CPU per image / the harness's): "
          f"{bound[0]:.2f}x with 0 workers, {bound[1]:.2f}x with 2")
    print(f"CPU ms per image by stage (harness, 1 process, 0 workers; total {staged['eval_cpu_ms']:.2f}): "
          f"{stages.report(a.n, staged['eval_cpu_ms'])}")
    print(f"after the evaluation, records.finish (per-image boxes at the chosen tau, curves.json): "
          f"CPU {rates[(1, 2)]['finish_cpu_ms']:.2f} ms/image (not in the eval time)")
    model_s = a.n * FAKE_COST_S
    for w, r in fake.items():
        print(f"fixed 5 ms/image method (sleeps, no CPU), 1 process, {w} workers: {r['rate']:7.1f} img/s; model "
              f"{model_s:.2f} s, eval {r['eval_s']:.2f} s -> overhead {r['eval_s'] / model_s - 1:+.1%}"
              f"{'   (target <= 10%)' if w == 2 else ''}")
    steady = (fake[2]["eval_s"] - fake_half["eval_s"]) / ((a.n - half) * FAKE_COST_S) - 1
    print(f"   the same with {half} images: eval {fake_half['eval_s']:.2f} s; the last {a.n - half} images took "
          f"{fake[2]['eval_s'] - fake_half['eval_s']:.2f} s -> overhead without the start (first decode, worker "
          f"start) and the tail (scoring after the last model call): {steady:+.1%}")
    print(f"a 15 ms/image method (a diagnostic: slower than the scoring), 0 workers: model {a.n * SLOW_COST_S:.2f} s, "
          f"eval {slow['eval_s']:.2f} s -> overhead {slow['eval_s'] / (a.n * SLOW_COST_S) - 1:+.1%}")

if __name__ == "__main__":
    main()
