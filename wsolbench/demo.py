"""The README's main job: a small benchmark on the synthetic world that ends with a Markdown leaderboard.

It generates the synthetic CUB-format and VOC-format sets (cached), trains the tiny profiles that need
training, evaluates every requested method that can serve each set, and prints + writes the leaderboard.
Runs resume: a second ``wsolbench demo`` reuses finished work (``--fresh`` discards it).
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Sequence

DEMO_DATASETS = ("synthetic-cub", "synthetic-voc")
# Fast methods first; the foundation-model methods need the synthetic zoo (built once, then cached).
DEMO_METHODS = ("center", "random", "cam", "tedloc", "mmcst", "wwbl", "genpromp")


def available(methods: Sequence[str]) -> list[str]:
    """The names in ``methods`` that are registered here (a method that is not finished is not registered)."""
    from .registry import list_methods

    known = set(list_methods())
    return [m for m in methods if m in known]


def zoo_ready(methods: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split ``methods`` into (runnable now, waiting for zoo models that are not built yet). Building the
    tiny zoo takes longer than the rest of the demo, so the default demo leaves those methods out (and
    says so) instead of starting a long build; ``--methods`` names them to build and run them anyway."""
    from .registry import get_method_class

    ready, waiting = [], []
    status = None
    for name in methods:
        needs = get_method_class(name).tiny_zoo
        if needs and status is None:
            from . import zoo

            status = zoo.zoo_status("tiny")  # read the manifest once, for every method
        (waiting if needs and not all(status[m]["built"] for m in needs) else ready).append(name)
    return ready, waiting


def run_demo(out: Path = Path("runs/demo"), leaderboard_dir: Path = Path("leaderboards"),
             methods: Sequence[str] | None = None, fresh: bool = False,
             datasets: Sequence[str] = DEMO_DATASETS) -> Path:
    """Run the demo benchmark; returns the path of the written leaderboard."""
    from .harness import HarnessError, RunSpec, choose_task, run
    from .leaderboard import build_tables, load_runs, render, write
    from .report import show_groups
    from .registry import create_dataset, get_method_class

    t0 = time.time()
    out = Path(out)
    if fresh and out.exists():
        shutil.rmtree(out)
    names = available(methods or DEMO_METHODS)
    if not methods:
        names, waiting = zoo_ready(names)
        if waiting:
            from .zoo import build_command

            print(f"wsolbench demo: {', '.join(waiting)} left out: their tiny profile needs the synthetic-world "
                  f"zoo, which is not built yet (`{build_command('tiny')}`, about 17 min once; or "
                  f"`wsolbench demo --methods {' '.join(names + waiting)}` builds it on the way)", flush=True)
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
            t = time.time()
            print(f"  {name} on {dataset} ...", flush=True)
            result = run(RunSpec(method=name, dataset=dataset, split="test", profile="tiny", out=out,
                                 resume=True))
            run_dirs.setdefault(dataset, []).append(result.run_dir)
            headline = {k: round(v, 2) for k, v in result.results["default"].items()
                        if k in ("maxboxacc", "maxboxacc_v2", "top1_loc", "miou", "pxap") and v is not None}
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
