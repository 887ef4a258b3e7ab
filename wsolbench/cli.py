"""The ``wsolbench`` command: run, leaderboard, list, data, weights, zoo, profile, make-synthetic, demo, show."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator, Sequence

from .demo import DEMO_DATASETS

# Exit statuses (README "Command line"): the same meaning in every subcommand.
EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE, EXIT_BAD_INPUT, EXIT_MISSING_WEIGHTS = 0, 1, 2, 3, 4
# Known errors as "module:Class", matched against the exception's classes, so that nothing is imported to
# classify one. Bad input (3): config, data, arguments, names; each message names the file/field and the fix.
BAD_INPUT_ERRORS = (
    "wsolbench.config:ConfigError", "wsolbench.localizer:InputError", "wsolbench.registry:RegistryError",
    "wsolbench.harness:HarnessError", "wsolbench.datasets.base:DatasetError", "wsolbench.checkpoint:CheckpointError",
    "wsolbench.protocols:ProtocolError", "wsolbench.metrics.base:MetricInputError", "wsolbench.report:ReportError",
    "builtins:FileNotFoundError", "builtins:NotADirectoryError",
)
# Missing weights (4): pretrained weights or the synthetic-world zoo; the message says what, where and the fix.
MISSING_WEIGHTS_ERRORS = ("wsolbench.weights:MissingWeightsError", "wsolbench.zoo:ZooMissingError")
EPILOG = """exit status: 0 ok, 1 unexpected error (a bug), 2 usage error, 3 bad input (config, data, arguments,
a missing optional dependency: the message names the file/field and the fix), 4 missing weights (pretrained
weights or the synthetic-world zoo: the message says what, where, and the command that gets them)"""
# Import names of optional dependencies whose distribution is named otherwise.
IMPORT_TO_DIST = {"open_clip": "open_clip_torch"}


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", required=True, help="registered method name (see `wsolbench list methods`)")
    p.add_argument("--dataset", required=True, help="registered dataset name (see `wsolbench list datasets`)")
    p.add_argument("--split", default=None, help="default: the dataset's benchmark split (VOC train, COCO val, else test)")
    _add_profile_arg(p)
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("--out", type=Path, default=Path("runs"), help="runs directory (default: runs/)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run (same flags)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="skip training: a saved method directory, or a checkpoint FILE of the method's own code "
                        "(methods that read one, e.g. an MCTformer file for mmcst)")
    _add_set_arg(p)
    _add_data_root_arg(p)
    p.add_argument("--on-error", choices=("fail", "skip"), default=None,
                   help="what a corrupt image does: fail the run, or skip it (counted and listed)")
    p.add_argument("--run-id", default=None)
    p.add_argument("--protocol", default=None, metavar="NAME",
                   help="scoring protocol (`wsolbench list protocols`); default: the method config's for the task")
    p.add_argument("--train-split", default=None,
                   help="split a trained method fits on; default: the protocol's for the dataset, else train")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--workers", type=int, default=None,
                   help="image-decoding processes per rank (default: its share of the CPU cores, 0 below 2)")
    p.add_argument("--amp", choices=("bf16", "fp16"), default=None,
                   help="mixed precision for the model call (paper profiles on GPU); recorded, a separate run")
    _add_build_zoo_arg(p)


def _add_profile_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="paper", choices=("paper", "tiny"),
                   help="paper: the paper's architecture and real weights; tiny: small CPU models (the zoo)")


def _add_set_arg(p: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE`` (repeatable) wherever a method config is resolved; checked against the schema."""
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, checked against configs/<method>.yaml's keys and types before anything "
                        "runs, e.g. train.lr=1e-4 (method) or harness.batch_size=8 (repeatable)")


def _add_data_root_arg(p: argparse.ArgumentParser) -> None:
    """``--data-root`` in every subcommand that reads a dataset (``--root``: an older spelling, still accepted)."""
    p.add_argument("--data-root", type=Path, default=None, help="dataset directory (default: WSOLBENCH_DATA/<name>)")
    p.add_argument("--root", dest="data_root", type=Path, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _add_build_zoo_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--build-zoo", action="store_true",
                   help="build the synthetic-world zoo models a tiny profile needs if neither the cache nor the "
                        "zoo shipped with the package has them current (about 45 minutes on one CPU thread, once; same "
                        "as `wsolbench zoo build`); without it such a run exits with status 4 and that command")


@contextlib.contextmanager
def zoo_building(allowed: bool) -> Iterator[None]:
    """Within: zoo loaders may build missing models (``WSOLBENCH_ZOO_AUTOBUILD=1``, which worker processes
    inherit) if ``allowed``; the variable is restored afterwards."""
    from .zoo import AUTOBUILD_ENV

    before = os.environ.get(AUTOBUILD_ENV)
    if allowed:
        os.environ[AUTOBUILD_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(AUTOBUILD_ENV, None)
        else:
            os.environ[AUTOBUILD_ENV] = before


def check_run(method: str, dataset: str, profile: str, overrides: Sequence[str], checkpoint: Path | None = None,
              build_zoo: bool = False, protocol: str | None = None) -> None:
    """What can be checked before any work: the method, dataset and protocol names (without importing every
    method), each ``--set`` key and value type against the config schema, and the zoo models a tiny profile needs.
    Raises the error the CLI turns into status 3 (bad input) or 4 (missing zoo)."""
    from .config import load_harness_config, load_method_config, split_overrides
    from .registry import DATASETS, METHODS

    method, dataset = METHODS.canonical(method), DATASETS.canonical(dataset)
    if protocol is not None:
        from .protocols import get_protocol

        get_protocol(protocol)
    m_over, h_over = split_overrides(overrides)
    load_harness_config(h_over)
    dataset_key = getattr(DATASETS.get(dataset), "config_key", "") or dataset
    load_method_config(method, profile, dataset_key, m_over)
    if profile == "tiny" and checkpoint is None and not build_zoo:
        from . import zoo

        missing = zoo.missing_models("tiny", getattr(METHODS.get(method), "tiny_zoo", ()) or ())
        if missing:
            raise zoo.ZooMissingError(zoo.missing_message("tiny", missing))


def cmd_run(args: argparse.Namespace) -> int:
    overrides = list(args.set) + ([f"harness.on_error={args.on_error}"] if args.on_error else [])
    check_run(args.method, args.dataset, args.profile, overrides, args.checkpoint, args.build_zoo, args.protocol)
    from .harness import RunSpec, run  # after the checks: a bad name or value exits before numpy/torch load
    from .distributed import current as current_world
    from .leaderboard import build_tables, render

    spec = RunSpec(method=args.method, dataset=args.dataset, split=args.split, profile=args.profile,
                   limit=args.limit, out=args.out, resume=args.resume, device=args.device,
                   checkpoint=args.checkpoint, overrides=tuple(overrides), data_root=args.data_root,
                   run_id=args.run_id, progress=not args.quiet, workers=args.workers,
                   amp=args.amp, protocol=args.protocol,
                   train_split=args.train_split)
    with zoo_building(args.build_zoo):
        result = run(spec)
    if not current_world().is_main:  # under torchrun every rank holds the result; rank 0 reports it
        return 0
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

    problems = check_dataset(args.dataset, root=args.data_root)
    if problems:
        print("\n".join(problems))
        return EXIT_BAD_INPUT
    print(f"{args.dataset}: layout and counts OK")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    """Print the resolved method and harness config, each value with the file (or --set) it came from."""
    from .config import config_dir, method_config_dir, resolve_harness_config, resolve_method_config, show_value, split_overrides, value_at
    from .registry import DATASETS, METHODS

    method = METHODS.canonical(args.method)
    dataset_key = None
    if args.dataset:
        dataset = DATASETS.canonical(args.dataset)
        dataset_key = getattr(DATASETS.get(dataset), "config_key", "") or dataset
    m_over, h_over = split_overrides(args.set)
    cfg, sources = resolve_method_config(method, args.profile, dataset_key, m_over)
    hcfg, hsources = resolve_harness_config(h_over)
    rows = [(key, show_value(value_at(cfg, key)), src) for key, src in sources.items()]
    rows += [(f"harness.{key}", show_value(value_at(hcfg, key)), src) for key, src in hsources.items()]
    print(f"# {method}, {args.profile} profile" + (f", dataset {args.dataset}" if args.dataset else "")
          + f"; files in {method_config_dir(method)} and {config_dir()}")
    width = min(max(len(k) + len(v) for k, v, _ in rows) + 2, 72)
    for key, value, src in rows:
        print(f"{key}: {value}".ljust(width) + f"  # {src}")
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
    from .registry import METHODS

    method = METHODS.canonical(args.method)  # an unknown name: status 3 with suggestions
    if not weights.weights_for_method(method):
        print(f"{method}: its paper profile uses no pretrained weights; nothing to fetch")
        return 0
    weights.fetch_for_method(method)
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

    run_demo(out=args.out, leaderboard_dir=args.leaderboard_dir, methods=args.methods, fresh=args.fresh,
             datasets=args.datasets, build_zoo=args.build_zoo)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from .report import show

    runs = ([args.run] if args.run else []) + list(args.compare or [])
    index = show(runs, args.out, worst=args.worst, ids=args.ids, variant=args.variant)
    print(f"report written to {index}")
    return 0


class _SyntheticHelp(argparse.HelpFormatter):
    """Help of ``make-synthetic``: ``--n`` lists the default split sizes from the one place they are set
    (read only when help is printed: importing the generator costs half a second)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.dest != "n":
            return action.help
        from wsolbench.datasets.synthetic import DEFAULT_COUNTS

        sizes = "; ".join(f"{fmt} " + " / ".join(f"{n} {split}" for split, n in counts.items())
                          for fmt, counts in DEFAULT_COUNTS.items())
        return f"{action.help} {sizes})"


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="wsolbench", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"wsolbench {__version__}")
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
    _add_data_root_arg(c)
    c.set_defaults(func=cmd_data_check)

    p = sub.add_parser("config", help="method configs: show the resolved values and where each comes from")
    csub = p.add_subparsers(dest="action", required=True)
    c = csub.add_parser("show", help="print a method's resolved config (files, profile, dataset, --set) "
                                     "with each value's source; runs nothing")
    c.add_argument("--method", required=True)
    c.add_argument("--dataset", default=None, help="adds the per-dataset files (configs/<method>_<dataset>.yaml)")
    _add_profile_arg(c)
    _add_set_arg(c)
    c.set_defaults(func=cmd_config_show)

    p = sub.add_parser("make-synthetic", help="write a synthetic world in a real dataset's on-disk format",
                       formatter_class=_SyntheticHelp)
    p.add_argument("--format", required=True,
                   choices=("cub", "wsol", "ilsvrc", "openimages", "voc", "coco", "flickr30k"))
    p.add_argument("--out", type=Path, required=True, help="folder to write (then `run --data-root` it)")
    p.add_argument("--n", type=int, default=None,
                   help="total images, split in the proportions of the built-in synthetic-<format> dataset "
                        "(default: that dataset's own split sizes:")
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
    _add_profile_arg(p)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--input-size", type=int, default=None)
    p.add_argument("--n", type=int, default=20, help="timed images")
    p.add_argument("--num-classes", type=int, default=200)
    _add_set_arg(p)
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("demo", help="the README's main job: a benchmark on the synthetic world")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--leaderboard-dir", type=Path, default=Path("leaderboards"))
    p.add_argument("--methods", nargs="*", default=None, help="default: every registered method")
    p.add_argument("--datasets", nargs="+", default=list(DEMO_DATASETS),
                   help=f"synthetic worlds to run on (default: {' '.join(DEMO_DATASETS)}; add synthetic-voc for the "
                        "VOC format)")
    p.add_argument("--fresh", action="store_true", help="discard earlier demo runs instead of resuming them")
    _add_build_zoo_arg(p)
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
    """Entry point; returns the exit status (EXIT_*). Known errors end with their message on stderr."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help / --version (0) and usage errors (2), after argparse has printed
        return int(exc.code or 0)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("wsolbench: interrupted; finished batches are cached — rerun with --resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader stopped early (`| head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:  # noqa: BLE001 - every error gets its documented status
        status = exit_status(exc)
        if status == EXIT_UNEXPECTED:
            import traceback

            traceback.print_exc()
            print("wsolbench: unexpected error (a bug: please report it with the lines above)", file=sys.stderr)
        else:
            print(f"wsolbench: error: {missing_extra(exc) or exc}", file=sys.stderr)
        return status


def exit_status(exc: BaseException) -> int:
    """The documented exit status of ``exc``: missing weights anywhere in its cause chain (the harness wraps
    some errors) is 4, a known bad-input error or a missing optional dependency is 3, anything else 1."""
    chain = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__
    if any(_is_one_of(e, MISSING_WEIGHTS_ERRORS) for e in chain):
        return EXIT_MISSING_WEIGHTS
    if _is_one_of(chain[0], BAD_INPUT_ERRORS) or missing_extra(chain[0]):
        return EXIT_BAD_INPUT
    return EXIT_UNEXPECTED


def _is_one_of(exc: BaseException, names: tuple[str, ...]) -> bool:
    return any(f"{c.__module__}:{c.__qualname__}" in names for c in type(exc).__mro__)


def missing_extra(exc: BaseException) -> str | None:
    """For an import of an optional dependency that is not installed: one line naming the pip extra that
    brings it (setup.cfg's extras, read from the installed metadata); else None."""
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    import importlib.metadata as md
    import re

    module = exc.name.split(".")[0]
    dist = IMPORT_TO_DIST.get(module, module)
    try:
        requires = md.requires("wsolbench") or []
    except md.PackageNotFoundError:
        return None
    extras = []
    for req in requires:
        found = re.match(r"([A-Za-z0-9_.\-]+).*;\s*extra\s*==\s*['\"]([\w-]+)['\"]", req)
        if found and found[1].lower().replace("_", "-") == dist.lower().replace("_", "-") and found[2] != "test":
            extras.append(found[2])
    if not extras:
        return None
    extra = min(extras, key=lambda e: (e == "all", len(e)))
    return (f"this needs {dist}, an optional dependency that is not installed: pip install 'wsolbench[{extra}]' "
            f"(or 'wsolbench[all]' for every method)")


if __name__ == "__main__":
    sys.exit(main())
