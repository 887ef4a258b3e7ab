"""The README's main job: a small benchmark on the synthetic world that ends with a Markdown leaderboard.

It generates the synthetic CUB-format and VOC-format sets (cached), trains the tiny profiles that need
training, evaluates every registered method (or those named) that can serve each set, and prints + writes the
leaderboard. The zoo models the tiny profiles stand on ship with the package (``wsolbench.zoo.shipped_root``;
a zoo built in the cache wins); if neither has them they are built first only when asked (``--build-zoo``).
Runs resume: a second ``wsolbench demo`` reuses finished work (``--fresh`` discards it).
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Sequence

# every method on the CUB-format world (15 minutes on 2 CPU cores, issue #25); `--datasets synthetic-cub
# synthetic-voc` adds the VOC-format world (dense mIoU, the methods that can train on multi-label sets)
DEMO_DATASETS = ("synthetic-cub",)


def demo_methods(methods: Sequence[str] | None = None) -> list[str]:
    """The named methods (registered names), or every registered method whose class says ``in_demo``: those
    that need no training first (they report at once), then by name."""
    from .registry import METHODS, list_methods

    if methods:
        return [METHODS.canonical(m) for m in methods]
    names = [m for m in list_methods() if METHODS.declared(m, "in_demo")]
    return sorted(names, key=lambda m: (bool(METHODS.declared(m, "needs_training")), m))


def zoo_models(methods: Sequence[str]) -> list[str]:
    """The tiny zoo models that ``methods`` stand on (their classes' ``tiny_zoo``), in the zoo's order."""
    from . import zoo
    from .registry import get_method_class

    return [m for m in zoo.MODELS if any(m in (get_method_class(n).tiny_zoo or ()) for n in methods)]


def missing_zoo(methods: Sequence[str]) -> list[str]:
    """The tiny zoo models that ``methods`` stand on and that neither the cache nor the shipped zoo has current."""
    from . import zoo

    wanted = zoo_models(methods)
    return zoo.missing_models("tiny", wanted) if wanted else []


def prepare_zoo(methods: Sequence[str], build: bool) -> None:
    """Before any run: build the zoo models ``methods`` need if asked (``--build-zoo``), else stop (status 4)
    naming the commands, instead of starting a long build nobody asked for."""
    from . import zoo

    missing = missing_zoo(methods)
    if not missing:
        return
    if not build:
        raise zoo.ZooMissingError(f"{zoo.missing_message('tiny', missing)}; or leave the zoo-based methods out: "
                                  f"`wsolbench demo --methods center random cam`")
    zoo.ensure_zoo("tiny", missing, build=True)


def run_demo(out: Path = Path("runs/demo"), leaderboard_dir: Path = Path("leaderboards"),
             methods: Sequence[str] | None = None, fresh: bool = False,
             datasets: Sequence[str] = DEMO_DATASETS, build_zoo: bool = False) -> Path:
    """Run the demo benchmark; returns the path of the written leaderboard."""
    from .harness import LEADERBOARD_METRICS, HarnessError, RunSpec, choose_task, run, trains_on
    from .leaderboard import build_tables, load_runs, render, write
    from .report import show_groups
    from .registry import create_dataset, get_method_class

    t0 = time.time()
    out = Path(out)
    names = demo_methods(methods)
    prepare_zoo(names, build_zoo)
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"wsolbench demo: methods {', '.join(names)} on {', '.join(datasets)} (tiny profile, CPU)", flush=True)
    run_dirs: dict[str, list[Path]] = {}  # per dataset, for the report
    for dataset in datasets:
        ds = create_dataset(dataset, split="test")  # generates the synthetic set on first use
        for name in names:
            probe = get_method_class(name)
            try:
                choose_task(ds, probe)
            except HarnessError:
                print(f"  {name} on {dataset}: skipped (no capability for this dataset's task)", flush=True)
                continue
            if not trains_on(probe, ds):
                print(f"  {name} on {dataset}: skipped (trains from one class label per image; this set is "
                      f"multi-label)", flush=True)
                continue
            t = time.time()
            print(f"  {name} on {dataset} ...", flush=True)
            result = run(RunSpec(method=name, dataset=dataset, split="test", profile="tiny", out=out,
                                 resume=True))
            run_dirs.setdefault(dataset, []).append(result.run_dir)
            headline = {k: round(v, 2) for k, v in result.results["default"].items()
                        if k in LEADERBOARD_METRICS and v is not None}
            print(f"  {name} on {dataset}: {headline} ({time.time() - t:.0f} s)", flush=True)
    tables = build_tables(load_runs(out))
    text = render(tables, "md")
    path = write(tables, leaderboard_dir, "md", name="demo")
    print()
    print(text)
    report = show_groups(run_dirs, out / "report")
    if report is not None:
        print(f"report (maps on the worst-localised images, curves) written to {report}")
    print(f"leaderboard written to {path}; demo took {time.time() - t0:.0f} s")
    return path
