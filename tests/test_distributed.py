"""Several processes (torchrun, gloo on CPU) and the data pipeline give the numbers of one sequential process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wsolbench import distributed, harness, pipeline
from wsolbench.distributed import RankBatches, World
from wsolbench.harness import RunSpec, run
from wsolbench.registry import METHODS, get_method_class

BIN = Path(sys.executable).parent
CENTER = ["--method", "center", "--dataset", "synthetic-cub", "--profile", "tiny", "--limit", "40",
          "--set", "harness.batch_size=4", "--quiet"]
# the tiny CAM trained for a few steps: enough to give maps that are not the centre prior's
CAM_TRAIN = ["--set", "train.epochs=2", "--set", "train.max_steps_per_epoch=3", "--set", "train.batch_size=8"]
CAM = ["--method", "cam", "--dataset", "synthetic-cub", "--profile", "tiny", "--limit", "24",
       "--set", "harness.batch_size=4", "--quiet"]

# a launcher entry that SIGKILLs rank KILL_RANK in the middle of its work (the KILL_AT-th evaluated batch,
# or the start of training epoch KILL_EPOCH), standing for a node lost mid-run
KILLER = """
import os, signal, sys
from wsolbench import pipeline, training
from wsolbench.cli import main

if os.environ.get("RANK") == os.environ["KILL_RANK"]:
    at = int(os.environ.get("KILL_AT", "0"))
    epoch = int(os.environ.get("KILL_EPOCH", "-1"))
    seen = {"n": 0}
    process, run_epoch = pipeline._process, training.TrainLoop._run_epoch

    def dying_process(*a, **k):
        seen["n"] += 1
        if seen["n"] == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return process(*a, **k)

    def dying_epoch(self, e, *a, **k):
        if e == epoch:
            os.kill(os.getpid(), signal.SIGKILL)
        return run_epoch(self, e, *a, **k)

    pipeline._process = dying_process
    training.TrainLoop._run_epoch = dying_epoch
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One isolated data/cache root for the module (the synthetic world is written once), 1 thread per rank."""
    root = tmp_path_factory.mktemp("dist")
    e = dict(os.environ, WSOLBENCH_DATA=str(root / "data"), WSOLBENCH_CACHE=str(root / "cache"),
             WSOLBENCH_WEIGHTS=str(root / "weights"), WSOLBENCH_CONFIG=str(root / "config.yaml"),
             OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    (root / "killer.py").write_text(KILLER)
    e["ROOT"] = str(root)
    return e


def _launch(env: dict, args: list[str], nproc: int, out: Path, run_id: str, extra_env: dict | None = None,
            killer: bool = False, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "wsolbench")] if not killer else [sys.executable, str(Path(env["ROOT"]) / "killer.py")]
    if nproc > 1:
        cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", "--no-python", *cmd]
    res = subprocess.run([*cmd, "run", *args, "--out", str(out), "--run-id", run_id], env={**env, **(extra_env or {})},
                         capture_output=True, text=True, timeout=600)
    if check:
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res


def _metrics(out: Path, run_id: str) -> dict:
    return json.loads((out / run_id / "metrics.json").read_text())


# ---- units ----------------------------------------------------------------------------------------------
def test_each_rank_takes_a_round_robin_share():
    shares = [World(rank=r, size=3).share(8) for r in range(3)]
    assert shares == [[0, 3, 6], [1, 4, 7], [2, 5]]
    assert distributed.SINGLE.share(3) == [0, 1, 2]


def test_rank_batches_split_the_single_process_batches():
    from torch.utils.data import BatchSampler, SequentialSampler

    batches = BatchSampler(SequentialSampler(range(11)), 4, drop_last=False)  # [0-3] [4-7] [8-10]
    ranks = [list(RankBatches(batches, r, 2)) for r in range(2)]
    assert ranks == [[[0, 1], [4, 5], [8, 9]], [[2, 3], [6, 7], [10]]]
    assert [len(RankBatches(batches, r, 2)) for r in range(2)] == [3, 3]
    tiny_tail = BatchSampler(SequentialSampler(range(9)), 4, drop_last=False)  # last batch [8]: < 2 ranks
    assert list(RankBatches(tiny_tail, 1, 2)) == [[2, 3], [6, 7]] and len(RankBatches(tiny_tail, 1, 2)) == 2


def test_launch_environment_is_read_and_checked(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.launched() == distributed.SINGLE
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(distributed.DistributedError, match="RANK=5 is outside WORLD_SIZE=4"):
        distributed.launched()
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    w = distributed.launched()
    assert (w.rank, w.size, w.local_rank, w.local_size) == (3, 4, 1, 2)
    assert distributed.rank_device("cuda", w) == "cuda:1" and distributed.rank_device("cpu", w) == "cpu"
    assert pipeline.default_workers(World(local_size=64)) == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)))
    assert pipeline.default_workers(World(local_size=4)) == 6 and pipeline.default_workers(World()) == 8


def test_data_parallel_fit_matches_the_methods_code():
    """A class declaring data_parallel_fit trains through TrainLoop + make_loader; the other trainable ones don't."""
    for name in METHODS.names():
        cls = get_method_class(name)
        if not cls.needs_training:
            continue
        src = "".join(f.read_text() for f in METHODS.home(name).glob("*.py"))  # the method's whole package
        through_loop = "TrainLoop" in src and "make_loader" in src
        assert through_loop == cls.data_parallel_fit, name


# ---- the pipeline in one process ---------------------------------------------------------------------
@pytest.fixture
def shared_env(env, monkeypatch, tmp_path):
    """In-process runs on the module's data root (the synthetic worlds are written once); runs in tmp_path."""
    for k in ("WSOLBENCH_DATA", "WSOLBENCH_CACHE", "WSOLBENCH_WEIGHTS", "WSOLBENCH_CONFIG"):
        monkeypatch.setenv(k, env[k])
    return tmp_path


def _naive(evaluator, dataset, spans, on_error, opts, desc):
    """The plain loop the pipeline replaces: decode, localize, score, one batch after the other."""
    for k, (start, stop) in enumerate(spans):
        samples = [dataset[i] for i in range(start, stop)]
        images = [s.load_image() for s in samples]
        yield k, (*evaluator.process(samples, images), [])


def test_workers_and_overlap_give_the_plain_loops_numbers(shared_env, monkeypatch):
    def go(run_id, workers):
        r = run(RunSpec(method="random", dataset="synthetic-cub", limit=20, out=shared_env / "runs", progress=False,
                        overrides=("harness.batch_size=4",), run_id=run_id, workers=workers))
        return r.results, (r.run_dir / "per_image.jsonl").read_text(), r.record

    piped = go("w2", 2)
    assert piped[2]["parallel"] == {"world_size": 1, "backend": None, "workers_per_rank": 2, "amp": None}
    assert piped[2]["eval_images_per_s"] > 0
    monkeypatch.setattr(harness, "scored_batches", _naive)
    plain = go("plain", 0)
    assert piped[:2] == plain[:2]


def test_amp_is_a_separate_recorded_run(shared_env):
    base = dict(method="center", dataset="synthetic-cub", limit=8, out=shared_env / "runs", progress=False,
                workers=0)
    plain, amp = run(RunSpec(**base)), run(RunSpec(**base, amp="bf16"))
    assert amp.run_dir != plain.run_dir and amp.record["parallel"]["amp"] == "bf16"
    with pytest.raises(ValueError, match="--amp must be one of bf16, fp16"):
        run(RunSpec(**base, amp="int8"))


# ---- torchrun, 2 processes on gloo -------------------------------------------------------------------
@pytest.fixture(scope="module")
def center_one(env, tmp_path_factory) -> Path:
    """The 1-process run of ``center`` the 2-process runs must reproduce."""
    out = tmp_path_factory.mktemp("one")
    _launch(env, CENTER, 1, out, "one")
    return out / "one"


def test_two_processes_give_the_one_process_metrics(env, center_one, tmp_path):
    _launch(env, CENTER, 2, tmp_path, "two")
    one, two = json.loads((center_one / "metrics.json").read_text()), _metrics(tmp_path, "two")
    assert two["results"] == one["results"] and two["n_images"] == one["n_images"] == 40
    assert two["parallel"]["world_size"] == 2 and two["parallel"]["backend"] == "gloo"
    # per-image records merged in dataset order
    assert (tmp_path / "two" / "per_image.jsonl").read_text() == (center_one / "per_image.jsonl").read_text()
    assert len(list((tmp_path / "two" / "cache").glob("batch-*.npz"))) == 10


def test_a_killed_rank_resumes_to_the_same_metrics(env, center_one, tmp_path):
    # the (IN_FLIGHT + 2)-th batch starts once the results of the 1st and 2nd are written (the main thread
    # writes batch k's shard before it hands batch k + IN_FLIGHT to the scoring threads)
    kill_at = pipeline.IN_FLIGHT + 2
    res = _launch(env, CENTER, 2, tmp_path, "killed", {"KILL_RANK": "1", "KILL_AT": str(kill_at)}, killer=True,
                  check=False)
    assert res.returncode != 0 and not (tmp_path / "killed" / "metrics.json").exists()
    done = {int(p.stem.split("-")[1]) // 4 for p in (tmp_path / "killed" / "cache").glob("batch-*.npz")}
    # rank 1 scores the odd batches 1, 3, 5, 7, 9; it wrote 1 and 3 and died when its kill_at-th began
    assert {1, 3} <= done and not {7, 9} & done
    _launch(env, [*CENTER, "--resume"], 2, tmp_path, "killed")
    assert _metrics(tmp_path, "killed")["results"] == json.loads((center_one / "metrics.json").read_text())["results"]


def test_ddp_trained_cam_checkpoints_and_two_processes_score_it_like_one(env, tmp_path):
    """DDP training of the tiny CAM on 2 processes writes one checkpoint (rank 0) with the global batch
    recorded; one process scoring that checkpoint gives the 2-process run's metrics."""
    _launch(env, [*CAM, *CAM_TRAIN], 2, tmp_path, "ddp")
    rec = _metrics(tmp_path, "ddp")
    assert rec["parallel"]["training"]["lr_scale"] == 1.0 and rec["parallel"]["world_size"] == 2
    history = json.loads((tmp_path / "ddp" / "train" / "history.json").read_text())
    assert [h["steps"] for h in history] == [3, 3]
    assert all(h["world_size"] == 2 and h["global_batch"] == 8 for h in history)
    assert (tmp_path / "ddp" / "train" / "last.pt").exists()
    _launch(env, [*CAM, "--checkpoint", str(tmp_path / "ddp" / "checkpoint")], 1, tmp_path, "one")
    assert _metrics(tmp_path, "one")["results"] == rec["results"]


@pytest.mark.slow
def test_ddp_training_killed_mid_run_resumes_to_the_same_weights(env, tmp_path):
    from safetensors.torch import load_file

    _launch(env, [*CAM, *CAM_TRAIN], 2, tmp_path, "whole")
    res = _launch(env, [*CAM, *CAM_TRAIN], 2, tmp_path, "cut", {"KILL_RANK": "1", "KILL_EPOCH": "1"},
                  killer=True, check=False)
    assert res.returncode != 0
    assert json.loads((tmp_path / "cut" / "train" / "history.json").read_text())[0]["epoch"] == 1
    _launch(env, [*CAM, *CAM_TRAIN, "--resume"], 2, tmp_path, "cut")
    a = load_file(tmp_path / "whole" / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert _metrics(tmp_path, "cut")["results"] == _metrics(tmp_path, "whole")["results"]
