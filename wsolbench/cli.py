"""The ``wsolbench`` command: run, leaderboard, list, data, weights, zoo, profile, make-synthetic, demo, show."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", required=True, help="registered method name (see `wsolbench list methods`)")
    p.add_argument("--dataset", required=True, help="registered dataset name (see `wsolbench list datasets`)")
    p.add_argument("--split", default=None, help="default: the dataset's benchmark split (VOC train, COCO val, else test)")
    p.add_argument("--profile", default="paper", choices=("paper", "tiny"),
                   help="paper: the paper's architecture and real weights; tiny: small CPU models (the zoo)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("--out", type=Path, default=Path("runs"), help="runs directory (default: runs/)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run (same flags)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="skip training: a saved method directory, or a checkpoint FILE of the method's own code "
                        "(methods that read one, e.g. an MCTformer file for mmcst)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. train.lr=1e-4 (method) or harness.batch_size=8")
    p.add_argument("--data-root", type=Path, default=None, help="dataset directory (default: WSOLBENCH_DATA/<name>)")
    p.add_argument("--on-error", choices=("fail", "skip"), default=None,
                   help="what a corrupt image does: fail the run, or skip it (counted and listed)")
    p.add_argument("--run-id", default=None)
    p.add_argument("--protocol", default=None, metavar="NAME",
                   help="scoring protocol (`wsolbench list protocols`); default: the method config's for the task")
    p.add_argument("--train-split", default=None,
                   help="split a trained method fits on; default: the protocol's for the dataset, else train")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def cmd_run(args: argparse.Namespace) -> int:
    from .harness import RunSpec, run
    from .leaderboard import build_tables, render

    overrides = list(args.overrides) + ([f"harness.on_error={args.on_error}"] if args.on_error else [])
    spec = RunSpec(method=args.method, dataset=args.dataset, split=args.split, profile=args.profile,
                   limit=args.limit, out=args.out, resume=args.resume, device=args.device,
                   checkpoint=args.checkpoint, overrides=tuple(overrides), data_root=args.data_root,
                   run_id=args.run_id, progress=not args.quiet, protocol=args.protocol,
                   train_split=args.train_split)
    result = run(spec)
    print(render(build_tables([result.record], with_paper=False)))
    skipped = result.record["skipped"]["count"]
    if skipped:
        print(f"skipped {skipped} unreadable image(s); listed in {result.run_dir / 'metrics.json'}")
    print(f"run written to {result.run_dir}")
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from .leaderboard import build_tables, load_runs, render, write

    tables = build_tables(load_runs(args.runs), paper_csv=args.paper_csv, with_paper=not args.no_paper)
    if not tables:
        print(f"no finished runs under {args.runs}")
        return 0
    print(render(tables, args.format))
    if args.out is not None:
        path = write(tables, args.out, args.format)
        print(f"written to {path}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .registry import list_datasets, list_methods

    if args.what == "protocols":
        from .protocols import describe_protocols

        print("\n".join(describe_protocols()))
        return 0
    names = list_methods(args.pattern) if args.what == "methods" else list_datasets(args.pattern)
    print("\n".join(names))
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from wsolbench.datasets.check import check_dataset

    problems = check_dataset(args.dataset, root=args.root)
    if problems:
        print("\n".join(problems))
        return 1
    print(f"{args.dataset}: layout and counts OK")
    return 0


def cmd_make_synthetic(args: argparse.Namespace) -> int:
    from wsolbench.datasets.synthetic import make_synthetic

    out = make_synthetic(args.format, args.out, args.n, args.seed)
    print(f"wrote a synthetic {args.format}-format dataset to {out}")
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    from . import weights

    if args.action == "list":
        from tabulate import tabulate

        rows = weights.list_weights()
        print(tabulate(rows, headers="keys"))
        return 0
    weights.fetch_for_method(args.method)
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    from .zoo import build_zoo

    report = build_zoo(args.scale, seed=args.seed, models=args.models or None, progress=True)
    for name, figures in report.items():
        print(f"{name}: {figures}")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from .config import load_method_config
    from .profiling import profile_method
    from .registry import METHODS, create_method

    config = load_method_config(METHODS.canonical(args.method), profile=args.profile, overrides=args.set)
    method = create_method(args.method, device=args.device, config=config,
                           class_names=[f"class{i}" for i in range(args.num_classes)])
    figures = profile_method(method, input_size=args.input_size, n_images=args.n, device=args.device)
    for key, value in figures.items():
        print(f"{key}: {value}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out=args.out, leaderboard_dir=args.leaderboard_dir, methods=args.methods, fresh=args.fresh)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from .report import show

    runs = ([args.run] if args.run else []) + list(args.compare or [])
    index = show(runs, args.out, worst=args.worst, ids=args.ids, variant=args.variant)
    print(f"report written to {index}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsolbench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run one method on one dataset split and score it")
    _add_run_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("leaderboard", help="merge runs into per-dataset tables beside paper numbers")
    p.add_argument("--runs", type=Path, default=Path("runs"))
    p.add_argument("--format", choices=("md", "csv"), default="md")
    p.add_argument("--out", type=Path, default=None, help="also write leaderboard.<format> here")
    p.add_argument("--paper-csv", type=Path, default=None)
    p.add_argument("--no-paper", action="store_true", help="measured rows only")
    p.set_defaults(func=cmd_leaderboard)

    p = sub.add_parser("list", help="list registered methods, datasets or scoring protocols")
    p.add_argument("what", choices=("methods", "datasets", "protocols"))
    p.add_argument("pattern", nargs="?", default=None, help="shell-style filter, e.g. 'synthetic-*'")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("data", help="dataset utilities")
    dsub = p.add_subparsers(dest="action", required=True)
    c = dsub.add_parser("check", help="validate a dataset's layout and counts")
    c.add_argument("--dataset", required=True)
    c.add_argument("--root", type=Path, default=None)
    c.set_defaults(func=cmd_data_check)

    p = sub.add_parser("make-synthetic", help="write a synthetic world in a real dataset's on-disk format")
    p.add_argument("--format", required=True,
                   choices=("cub", "wsol", "ilsvrc", "openimages", "voc", "coco", "flickr30k"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_synthetic)

    p = sub.add_parser("weights", help="pretrained weights: where they are, fetch them (needs network)")
    wsub = p.add_subparsers(dest="action", required=True)
    wsub.add_parser("list", help="each model the paper profiles use, found or missing").set_defaults(func=cmd_weights)
    f = wsub.add_parser("fetch", help="download what a method's paper profile needs (on a networked machine)")
    f.add_argument("--method", required=True)
    f.set_defaults(func=cmd_weights)

    p = sub.add_parser("zoo", help="the synthetic-world model zoo used by the tiny profiles")
    zsub = p.add_subparsers(dest="action", required=True)
    b = zsub.add_parser("build", help="pretrain the zoo models on the synthetic world and cache them")
    b.add_argument("--scale", default="tiny", choices=("micro", "tiny"))
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--models", nargs="*", default=None)
    b.set_defaults(func=cmd_zoo)

    p = sub.add_parser("profile", help="parameters and per-image latency of a method")
    p.add_argument("--method", required=True)
    p.add_argument("--profile", default="paper", choices=("paper", "tiny"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--input-size", type=int, default=None)
    p.add_argument("--n", type=int, default=20, help="timed images")
    p.add_argument("--num-classes", type=int, default=200)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="method config override, e.g. encoder.name=vit_base_patch16_224 (repeatable)")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("demo", help="the README's main job: a benchmark on the synthetic world")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--leaderboard-dir", type=Path, default=Path("leaderboards"))
    p.add_argument("--methods", nargs="*", default=None, help="default: every registered method whose tiny zoo models are built")
    p.add_argument("--fresh", action="store_true", help="discard earlier demo runs instead of resuming them")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("show", help="a report of a run: maps on images (worst first), threshold curves, index.html")
    p.add_argument("run", type=Path, nargs="?", default=None, help="a finished run directory (runs/<run-id>)")
    p.add_argument("--out", type=Path, required=True, help="report directory (index.html and PNGs)")
    p.add_argument("--worst", type=int, default=None, help="show the N worst-localised images (default 12)")
    p.add_argument("--ids", nargs="+", default=None, help="show these image ids instead")
    p.add_argument("--variant", default="default", help="which map variant of the run (default: default)")
    p.add_argument("--compare", type=Path, nargs="+", default=None, metavar="RUN",
                   help="more run directories: the same images side by side across methods")
    p.set_defaults(func=cmd_show)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; known errors end with one line on stderr and exit status 2."""
    from .config import ConfigError
    from .localizer import InputError
    from .registry import RegistryError

    args = build_parser().parse_args(argv)
    known: tuple[type[BaseException], ...] = (ConfigError, InputError, RegistryError, FileNotFoundError)
    try:
        from .harness import HarnessError
        from wsolbench.datasets.base import DatasetError

        from .report import ReportError

        known += (HarnessError, DatasetError, ReportError)
        try:
            from .weights import MissingWeightsError

            known += (MissingWeightsError,)
        except ImportError:
            pass
        return args.func(args)
    except KeyboardInterrupt:
        print("wsolbench: interrupted; finished batches are cached — rerun with --resume", file=sys.stderr)
        return 130
    except known as exc:
        print(f"wsolbench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
