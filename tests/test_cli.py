"""The CLI contract: --version, one exit status per kind of failure, checks before work, the same flags."""
from __future__ import annotations

import configparser
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wsolbench import cli
from wsolbench.config import ConfigError
from wsolbench.registry import DATASETS, METHODS

REPO = Path(__file__).resolve().parents[1]


def _cli(env_root: Path, *args: str, code: str | None = None) -> subprocess.CompletedProcess:
    """``wsolbench ARGS`` in a fresh interpreter with the test's data and cache dirs (or run ``code``)."""
    env = {**os.environ, "WSOLBENCH_DATA": str(env_root / "data"), "WSOLBENCH_CACHE": str(env_root / "cache"),
           "WSOLBENCH_CONFIG": str(env_root / "config.yaml")}
    env.pop("WSOLBENCH_ZOO_AUTOBUILD", None)
    cmd = [sys.executable, "-c", code or "import sys; from wsolbench.cli import main; sys.exit(main(sys.argv[1:]))",
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_version(capsys):
    from wsolbench import __version__

    assert cli.main(["--version"]) == cli.EXIT_OK
    assert capsys.readouterr().out.strip() == f"wsolbench {__version__}"


def test_usage_error_exits_2(capsys):
    assert cli.main(["run", "--method", "cam"]) == cli.EXIT_USAGE  # --dataset missing
    assert "--dataset" in capsys.readouterr().err
    assert cli.main(["no-such-command"]) == cli.EXIT_USAGE


def test_bad_set_value_exits_3_before_any_work(isolated_env):
    t0 = time.perf_counter()
    out = _cli(isolated_env, "run", "--method", "cam", "--dataset", "synthetic-cub", "--profile", "tiny",
               "--set", "train.lr=abc", "--out", str(isolated_env / "runs"))
    seconds = time.perf_counter() - t0
    assert out.returncode == cli.EXIT_BAD_INPUT, out.stderr
    line = out.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "train.lr" in line and "a number" in line and "abc" in line
    assert not (isolated_env / "cache").exists() and not (isolated_env / "runs").exists()  # nothing generated
    print(f"--set train.lr=abc: exit 3 after {seconds:.2f} s")


def test_unknown_set_key_suggests_the_near_one(isolated_env):
    out = _cli(isolated_env, "run", "--method", "cam", "--dataset", "synthetic-cub", "--set", "train.lrr=0.1")
    assert out.returncode == cli.EXIT_BAD_INPUT
    assert "unknown key 'train.lrr'" in out.stderr and "did you mean 'train.lr'?" in out.stderr
    out = _cli(isolated_env, "run", "--method", "cam", "--dataset", "synthetic-cub", "--set", "harness.batchsize=4")
    assert out.returncode == cli.EXIT_BAD_INPUT and "did you mean 'harness.batch_size'?" in out.stderr


def test_unknown_method_exits_3_with_suggestions_without_importing_methods(isolated_env):
    code = ("import sys, time; t0 = time.perf_counter(); from wsolbench.cli import main; "
            "status = main(sys.argv[1:]); "
            "print(sorted(m for m in sys.modules if m.startswith('wsolbench.methods.')), 'torch' in sys.modules); "
            "print(f'{time.perf_counter() - t0:.3f}'); sys.exit(status)")
    out = _cli(isolated_env, "run", "--method", "tedlco", "--dataset", "synthetic-cub", code=code)
    assert out.returncode == cli.EXIT_BAD_INPUT
    assert "unknown method 'tedlco'; did you mean 'tedloc'?" in out.stderr
    imported, seconds = out.stdout.splitlines()
    assert imported == "[] False"  # resolving a name imports no method module (nor torch)
    print(f"unknown method: exit 3 after {seconds} s in-process")


def test_builtin_aliases_are_known_before_import_and_match_the_decorators():
    assert METHODS.canonical("ted-loc") == "tedloc" and DATASETS.canonical("imagenet") == "ilsvrc"
    for registry in (METHODS, DATASETS):
        for name in registry.builtins:
            registry.get(name)  # imports it: the decorator re-registers with its own aliases
            assert set(registry._entries[name].aliases) == set(registry.builtin_aliases.get(name, ())), name


def test_missing_zoo_exits_4_naming_the_build_command(isolated_env, capsys, monkeypatch):
    monkeypatch.delenv("WSOLBENCH_ZOO_AUTOBUILD", raising=False)
    monkeypatch.setenv("WSOLBENCH_ZOO_SHIPPED", "0")  # as if the package shipped no zoo
    status = cli.main(["run", "--method", "tedloc", "--dataset", "synthetic-cub", "--profile", "tiny",
                       "--out", str(isolated_env / "runs")])
    err = capsys.readouterr().err
    assert status == cli.EXIT_MISSING_WEIGHTS
    assert "`wsolbench zoo build --scale tiny --models vit,clip`" in err and "--build-zoo" in err
    assert not (isolated_env / "cache" / "synthetic").exists()  # stopped before generating the dataset


def test_a_tiny_constructor_does_not_build_the_zoo_unless_asked(isolated_env, monkeypatch):
    from wsolbench import zoo

    monkeypatch.delenv(zoo.AUTOBUILD_ENV, raising=False)
    with pytest.raises(zoo.ZooMissingError, match="wsolbench zoo build --scale micro --models classifier"):
        zoo.load_backbone("classifier", "micro")
    assert not zoo.zoo_root("micro").exists()
    with cli.zoo_building(True):
        assert zoo.autobuild()
    assert not zoo.autobuild() and zoo.AUTOBUILD_ENV not in os.environ


def test_exit_status_of_each_kind_of_error():
    from wsolbench.datasets.base import DatasetError
    from wsolbench.harness import HarnessError
    from wsolbench.weights import MissingWeightsError
    from wsolbench.zoo import ZooMissingError

    assert cli.exit_status(ConfigError("x")) == cli.EXIT_BAD_INPUT
    assert cli.exit_status(DatasetError("x")) == cli.EXIT_BAD_INPUT
    assert cli.exit_status(FileNotFoundError("x")) == cli.EXIT_BAD_INPUT
    assert cli.exit_status(MissingWeightsError("x")) == cli.EXIT_MISSING_WEIGHTS
    assert cli.exit_status(ZooMissingError("x")) == cli.EXIT_MISSING_WEIGHTS
    try:  # the harness wraps some errors: the cause decides
        try:
            raise MissingWeightsError("sd-v1-4 not found")
        except MissingWeightsError as exc:
            raise HarnessError("cannot build the method") from exc
    except HarnessError as wrapped:
        assert cli.exit_status(wrapped) == cli.EXIT_MISSING_WEIGHTS
    assert cli.exit_status(RuntimeError("x")) == cli.EXIT_UNEXPECTED
    assert cli.exit_status(ModuleNotFoundError("no diffusers", name="diffusers")) == cli.EXIT_BAD_INPUT
    assert "pip install 'wsolbench[diffusion]'" in cli.missing_extra(ModuleNotFoundError(name="diffusers"))
    assert "wsolbench[clip]" in cli.missing_extra(ModuleNotFoundError(name="open_clip.tokenizer"))
    assert cli.exit_status(ModuleNotFoundError("no foo", name="foo")) == cli.EXIT_UNEXPECTED


def test_unexpected_error_exits_1_with_the_traceback(monkeypatch, capsys):
    def boom(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "cmd_list", boom)
    assert cli.main(["list", "methods"]) == cli.EXIT_UNEXPECTED
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: a bug" in err and "unexpected error" in err


def test_bad_input_exits_3_and_missing_weights_4_from_the_commands(isolated_env, capsys):
    assert cli.main(["weights", "fetch", "--method", "nosuch"]) == cli.EXIT_BAD_INPUT
    assert "unknown method 'nosuch'" in capsys.readouterr().err
    assert cli.main(["data", "check", "--dataset", "cub", "--data-root", str(isolated_env / "nowhere")]) == 3


def test_same_flags_everywhere_old_spellings_hidden(capsys):
    parser = cli.build_parser()
    a = parser.parse_args(["data", "check", "--dataset", "cub", "--data-root", "/d"])
    b = parser.parse_args(["data", "check", "--dataset", "cub", "--root", "/d"])  # the old spelling
    c = parser.parse_args(["run", "--method", "cam", "--dataset", "cub", "--data-root", "/d"])
    assert a.data_root == b.data_root == c.data_root == Path("/d")
    assert parser.parse_args(["data", "check", "--dataset", "cub"]).data_root is None
    for argv in (["run", "--method", "cam", "--dataset", "cub"], ["profile", "--method", "cam"],
                 ["config", "show", "--method", "cam"]):
        args = parser.parse_args(argv + ["--set", "train.lr=1", "--profile", "tiny"])
        assert args.set == ["train.lr=1"] and args.profile == "tiny"
    assert cli.main(["data", "check", "--help"]) == 0
    help_text = capsys.readouterr().out
    assert "--data-root" in help_text and "--root" not in help_text.replace("--data-root", "")


def test_make_synthetic_defaults_to_the_builtin_sizes_and_says_them(capsys):
    from wsolbench.datasets.synthetic import DEFAULT_COUNTS

    assert cli.build_parser().parse_args(["make-synthetic", "--format", "cub", "--out", "/x"]).n is None
    assert cli.main(["make-synthetic", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    cub = DEFAULT_COUNTS["cub"]
    assert f"cub {cub['train']} train / {cub['val']} val / {cub['test']} test" in text


def test_config_show_prints_values_with_their_source_and_runs_nothing(isolated_env, capsys):
    assert cli.main(["config", "show", "--method", "cam", "--dataset", "synthetic-cub", "--profile", "tiny",
                     "--set", "train.lr=0.5", "--set", "harness.batch_size=4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# cam, tiny profile, dataset synthetic-cub")
    rows = {line.split(":")[0]: line for line in lines[1:]}
    assert re.search(r"^train\.lr: 0\.5 +# --set$", rows["train.lr"])
    assert rows["train.epochs"].endswith("# cam_tiny.yaml") and rows["variant"].endswith("# cam.yaml")
    assert re.search(r"^harness\.batch_size: 4 +# --set$", rows["harness.batch_size"])
    assert rows["harness.seed"].endswith("# harness.yaml") and rows["profile"].endswith("# --profile")
    assert not (isolated_env / "cache").exists()
    assert cli.main(["config", "show", "--method", "cam", "--set", "train.epochs=1.5"]) == cli.EXIT_BAD_INPUT
    assert "'train.epochs' expects an integer" in capsys.readouterr().err


def test_dependency_policy_ranges_extras_and_the_lock():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    requires = [r for r in cfg["options"]["install_requires"].splitlines() if r.strip()]
    assert requires and not any("==" in r for r in requires)
    extras = {k: {r for r in v.splitlines() if r.strip()} for k, v in cfg["options.extras_require"].items()}
    assert extras["all"] == extras["clip"] | extras["captioning"] | extras["diffusion"]
    name = re.compile(r"[A-Za-z0-9_.\-]+")
    locked = {name.match(line)[0].lower().replace("_", "-")
              for line in (REPO / "constraints.txt").read_text().splitlines() if "==" in line}
    wanted = {name.match(r)[0].lower().replace("_", "-") for r in requires + sorted(set().union(*extras.values()))}
    assert wanted <= locked, wanted - locked  # every direct dependency is locked
    assert "-c constraints.txt" in (REPO / ".ci" / "run").read_text()


def test_cam_and_the_baselines_need_no_optional_dependency(isolated_env):
    code = ("import sys\n"
            "for m in ('open_clip', 'timm', 'transformers', 'diffusers'): sys.modules[m] = None\n"
            "import torch, wsolbench\n"
            "for name in ('cam', 'center', 'random'):\n"
            "    m = wsolbench.create_method(name, profile='tiny', class_names=['a', 'b'])\n"
            "    assert m.localize(torch.rand(1, 3, 64, 64), classes=[0]).maps.ndim == 4\n"
            "print('ok')\n")
    out = _cli(isolated_env, code=code)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_type_check_accepts_what_python_callers_pass():
    import numpy as np

    from wsolbench.config import load_method_config

    cfg = load_method_config("cam", "tiny", None, {"tiny.widths": (8, 16, 32, 32), "train.epochs": np.int64(3),
                                                   "train.lr": 1, "train.nesterov": None})
    assert cfg["train"]["epochs"] == 3 and cfg["train"]["lr"] == 1
    for bad, expects in (({"train.epochs": True}, "an integer"), ({"tiny.widths": 3}, "a list"),
                         ({"train.lr": {"a": 1}}, "a number")):
        with pytest.raises(ConfigError, match=f"expects {expects}"):
            load_method_config("cam", "tiny", None, bad)


def test_unknown_protocol_exits_3_before_any_work(isolated_env, capsys):
    assert cli.main(["run", "--method", "center", "--dataset", "synthetic-cub", "--protocol", "wsolevalution",
                     "--out", str(isolated_env / "runs")]) == cli.EXIT_BAD_INPUT
    assert "unknown protocol 'wsolevalution'" in capsys.readouterr().err
    assert not (isolated_env / "cache").exists() and not (isolated_env / "runs").exists()
