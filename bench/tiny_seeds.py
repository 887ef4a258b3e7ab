"""Do the tiny profiles learn on any draw of the synthetic world, or only on seed 0?

Renders the synthetic world with several seeds (the default sets' split sizes), runs each tiny profile and the
``center`` baseline (under the method's protocol) on each, and prints one table: method × seed with the home metric, the centre prior, the
margin, and the mean ± spread over seeds. For the tiny CAM it also reports the first epoch whose training loss
falls below 2.2 (chance on the 10-class world is ln 10 = 2.30). Methods that stand on the synthetic-world zoo
(TeD-Loc, MMCST, WWbL, GenPromp) join only when ``wsolbench zoo build`` has run; for TeD-Loc the table adds
its own CLIP Grad-CAM pseudo-labels (the teacher it must beat).

    python bench/tiny_seeds.py                         # seeds 1,2,3; CAM + centre (+ zoo methods if built)
    python bench/tiny_seeds.py --seeds 1 --methods cam --formats cub

Figures depend on the machine's float summation order (torch threads): the table states the thread count.
On a CPU shared with other jobs run it with OMP_NUM_THREADS=1: two OpenMP threads on two busy cores made a
tiny-CAM epoch 10-20x slower (3.3 s -> 30-60 s) here.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

# (method, world format, registered dataset, home metric, extra --set overrides)
PLAN = (
    ("cam", "cub", "synthetic-cub", "gt_known_loc", ()),
    ("cam", "voc", "synthetic-voc", "miou", ()),
    ("tedloc", "cub", "synthetic-cub", "gt_known_loc", ("inference.report_pseudo_labels=true",)),
    ("genpromp", "cub", "synthetic-cub", "gt_known_loc", ()),
    ("mmcst", "voc", "synthetic-voc", "miou", ()),
    ("wwbl", "flickr30k", "synthetic-flickr30k", "pointing_game", ()),
)
CHANCE_LOSS = 2.2  # "left chance": below ln 10 = 2.30 by a clear step


@dataclass
class Row:
    method: str
    dataset: str
    seed: int
    metric: str
    value: float | None
    centre: float | None
    extra: str = ""  # CAM: first epoch below CHANCE_LOSS; TeD-Loc: its pseudo-labels' value; the centre under
    # its own protocol where the method's differs

    @property
    def margin(self) -> float | None:
        return None if self.value is None or self.centre is None else self.value - self.centre


def world(fmt: str, seed: int, root: Path) -> Path:
    """The synthetic world in ``fmt`` drawn with ``seed`` at the default sets' sizes (made once)."""
    from wsolbench.datasets.synthetic import make_synthetic

    path = root / f"{fmt}-seed{seed}"
    if not (path / "SYNTHETIC.json").exists():
        make_synthetic(fmt, path, seed=seed, overwrite=True)
    return path


def run_one(method: str, dataset: str, data_root: Path, out: Path, sets: tuple[str, ...] = (),
            protocol: str | None = None):
    from wsolbench.harness import RunSpec, run

    return run(RunSpec(method=method, dataset=dataset, profile="tiny", data_root=data_root, out=out,
                       overrides=sets, progress=False, resume=True, protocol=protocol))


def left_chance(run_dir: Path) -> str:
    """The first 1-based epoch whose mean training loss is below CHANCE_LOSS, of how many."""
    history = json.loads((run_dir / "train" / "history.json").read_text(encoding="utf-8"))
    first = next((i + 1 for i, h in enumerate(history) if h["loss"] < CHANCE_LOSS), None)
    return f"loss<{CHANCE_LOSS} at epoch {first if first else 'never'}/{len(history)}"


def centre_own_protocol(dataset: str, data_root: Path, runs: Path, protocol: str, metric: str) -> str:
    """The centre prior under its own default protocol, when the method's differs (a fixed-threshold protocol
    such as GenPromp's can score the broad centre Gaussian near 0, which makes "beats the centre" trivial)."""
    own = run_one("center", dataset, data_root, runs)
    name = own.record["protocol"]["name"]
    return "" if name == protocol else f"centre under {name} {_fmt(own.results['default'].get(metric))}"


def zoo_ready(method: str) -> bool:
    from wsolbench.demo import missing_zoo

    return not missing_zoo([method])


def measure(seeds: list[int], methods: list[str], formats: list[str], root: Path) -> list[Row]:
    rows = []
    for method, fmt, dataset, metric, sets in PLAN:
        if method not in methods or fmt not in formats:
            continue
        if method != "cam" and not zoo_ready(method):
            print(f"# {method}: the tiny zoo is not built (`wsolbench zoo build`); left out", flush=True)
            continue
        for seed in seeds:
            data = world(fmt, seed, root / "worlds")
            t0 = time.time()
            res = run_one(method, dataset, data, root / "runs", sets)
            protocol = res.record["protocol"]["name"]  # the centre prior scored like the method (like with like)
            centre = run_one("center", dataset, data, root / "runs", protocol=protocol).results["default"].get(metric)
            extra = centre_own_protocol(dataset, data, root / "runs", protocol, metric)
            if method == "cam" and fmt == "cub":
                extra = left_chance(res.run_dir)
            if method == "tedloc":
                extra = f"pseudo-labels {res.results.get('clip_gradcam', {}).get(metric)}; {extra}".rstrip("; ")
            rows.append(Row(method, dataset, seed, metric, res.results["default"].get(metric), centre, extra))
            print(f"{method:9s} {dataset:20s} seed {seed}: {metric} {rows[-1].value} vs centre {centre} "
                  f"{extra} ({time.time() - t0:.0f} s)", flush=True)
    return rows


def zoo_used(methods: list[str]) -> str:
    """Where each zoo model the methods load comes from and the world seed it was built with (a built zoo in
    the cache wins over the shipped one: `wsolbench zoo build --seed N` puts another draw's zoo under the table)."""
    from wsolbench.demo import zoo_models
    from wsolbench.zoo import locate, shipped_root
    from wsolbench.zoo.manifest import read_manifest

    parts = []
    for model in zoo_models(methods):
        root = locate(model)
        if root is None:
            continue
        seed = read_manifest(root)["models"][model]["seed"]
        parts.append(f"{model} seed {seed} ({'shipped' if root == shipped_root() else root})")
    return ", ".join(parts) or "none"


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f}"


def _spread(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f} (min {min(values):.1f})"


def table(rows: list[Row]) -> str:
    """Markdown: one line per (method, dataset, seed), then mean ± sd (min) per (method, dataset)."""
    lines = ["| method | dataset | seed | metric | value | centre | margin | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.method} | {r.dataset} | {r.seed} | {r.metric} | {_fmt(r.value)} | {_fmt(r.centre)} | "
                     f"{_fmt(r.margin)} | {r.extra} |")
    for key in dict.fromkeys((r.method, r.dataset) for r in rows):
        group = [r for r in rows if (r.method, r.dataset) == key]
        vals = [r.value for r in group if r.value is not None]
        margins = [r.margin for r in group if r.margin is not None]
        centres = [r.centre for r in group if r.centre is not None]
        lines.append(f"| **{key[0]}** | {key[1]} | all | {group[0].metric} | {_spread(vals)} | {_spread(centres)} "
                     f"| {_spread(margins)} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="1,2,3", help="world seeds (comma-separated; the default sets use 0)")
    p.add_argument("--methods", default="cam,tedloc,genpromp,mmcst,wwbl")
    p.add_argument("--formats", default="cub,voc,flickr30k")
    p.add_argument("--out", type=Path, default=Path("runs/tiny_seeds"), help="worlds and runs (resumable)")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = measure(seeds, args.methods.split(","), args.formats.split(","), args.out)
    print(f"\nTiny profiles on world seeds {seeds} ({torch.get_num_threads()} torch threads); zoo: "
          f"{zoo_used(args.methods.split(','))}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
