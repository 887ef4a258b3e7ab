"""States are sums: metrics over shards, merged (or summed across processes), equal the metric over all."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wsolbench.metrics import (DenseMIoU, GroundingBoxAccuracy, MaxBoxAcc, MetricInputError, PhrasePointing,
                               PointingGame, PxAP, ThresholdPolicy)

SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _maps(rng, n, size=16):
    out = []
    for k in range(n):
        m = rng.random((size, size))
        if k % 2:
            m = (m > 0.7) * rng.random()
        out.append(m.astype(np.float32))
    return out


def _boxes(rng, n, size=16):
    out = []
    for _ in range(n):
        x0, x1 = sorted(rng.integers(0, size, 2))
        y0, y1 = sorted(rng.integers(0, size, 2))
        out.append(np.array([[x0, y0, x1, y1]]))
    return out


def _split(n, cuts):
    points = sorted({c % (n + 1) for c in cuts} | {0, n})
    return list(zip(points[:-1], points[1:]))


def _check_merge(make, feed, n, cuts):
    whole = make()
    feed(whole, 0, n)
    shards = []
    for a, b in _split(n, cuts):
        s = make()
        feed(s, a, b)
        shards.append(s)
    merged = make()
    for s in shards:
        merged.merge(s)
    for k, v in whole.state_dict().items():
        assert np.array_equal(merged.state_dict()[k], v), k
    assert merged.count == whole.count == n
    assert merged.compute() == whole.compute()
    # state_dict round trip
    restored = make()
    restored.load_state_dict(merged.state_dict())
    assert restored.compute() == whole.compute()


@SETTINGS
@given(seed=st.integers(0, 2**16), n=st.integers(1, 8), cuts=st.lists(st.integers(0, 8), max_size=3),
       multi=st.booleans())
def test_maxboxacc_merge(seed, n, cuts, multi):
    rng = np.random.default_rng(seed)
    maps, boxes = _maps(rng, n), _boxes(rng, n)
    preds = [rng.integers(0, 4, 5) for _ in range(n)]
    labels = [int(rng.integers(0, 4)) for _ in range(n)]

    def feed(metric, a, b):
        if b > a:
            metric.update(maps[a:b], boxes[a:b], preds[a:b], labels[a:b])

    _check_merge(lambda: MaxBoxAcc(multi_contour=multi), feed, n, cuts)


@SETTINGS
@given(seed=st.integers(0, 2**16), n=st.integers(1, 8), cuts=st.lists(st.integers(0, 8), max_size=3))
def test_pxap_merge(seed, n, cuts):
    rng = np.random.default_rng(seed)
    maps = _maps(rng, n)
    fgs = [rng.random((16, 16)) < 0.4 for _ in range(n)]
    for f in fgs:
        f[0, 0] = True
    igns = [rng.random((16, 16)) < 0.1 for _ in range(n)]

    def feed(metric, a, b):
        if b > a:
            metric.update(maps[a:b], fgs[a:b], igns[a:b])

    _check_merge(lambda: PxAP(0.01), feed, n, cuts)


@SETTINGS
@given(seed=st.integers(0, 2**16), n=st.integers(1, 6), cuts=st.lists(st.integers(0, 6), max_size=3))
def test_dense_and_pointing_merge(seed, n, cuts):
    rng = np.random.default_rng(seed)
    classes = [rng.choice(4, size=int(rng.integers(0, 3)), replace=False) for _ in range(n)]
    maps = [rng.random((len(c), 12, 10)).astype(np.float32) for c in classes]
    gts = [rng.integers(0, 5, (12, 10)).astype(np.uint8) for _ in range(n)]

    def feed_dense(metric, a, b):
        if b > a:
            metric.update(maps[a:b], classes[a:b], gts[a:b])

    _check_merge(lambda: DenseMIoU(5), feed_dense, n, cuts)

    pmaps = _maps(rng, n)
    pboxes = _boxes(rng, n)
    pcls = [int(rng.integers(0, 3)) for _ in range(n)]

    def feed_point(metric, a, b):
        if b > a:
            metric.update(pmaps[a:b], pboxes[a:b], pcls[a:b])

    _check_merge(lambda: PointingGame(3), feed_point, n, cuts)

    def feed_phrase(metric, a, b):
        if b > a:
            metric.update(pmaps[a:b], pboxes[a:b])

    _check_merge(PhrasePointing, feed_phrase, n, cuts)


def test_merge_rejects_different_options_and_types():
    with pytest.raises(MetricInputError):
        MaxBoxAcc(cam_curve_interval=0.01).merge(MaxBoxAcc(cam_curve_interval=0.001))
    with pytest.raises(TypeError):
        MaxBoxAcc().merge(PxAP())
    with pytest.raises(MetricInputError):
        PxAP(0.01).load_state_dict(PxAP(0.001).state_dict())


def test_reset_and_declarations():
    for metric in (MaxBoxAcc(), PxAP(), DenseMIoU(3), PointingGame(2), PhrasePointing(), GroundingBoxAccuracy()):
        assert metric.higher_is_better and all(metric.higher_is_better.values())
        assert metric.count == 0 and isinstance(metric.options(), dict)
    m = MaxBoxAcc()
    m.update([np.zeros((8, 8), np.float32)], [[[0, 0, 0, 0]]])
    assert m.count == 1
    m.reset()
    assert m.count == 0 and not m.state_dict()["num_correct"].any()
    assert ThresholdPolicy.oracle().kind == "oracle"


# ------------------------------------------------------------------ 2-process gloo all_reduce
_WORKER = textwrap.dedent("""
    import sys
    import numpy as np
    import torch.distributed as dist
    from wsolbench.metrics import MaxBoxAcc, PxAP, DenseMIoU
    rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    rng = np.random.default_rng(0)
    maps = [rng.random((16, 16)).astype(np.float32) for _ in range(6)]
    boxes = [np.array([[2, 3, 9, 12]])] * 6
    fgs = [rng.random((16, 16)) < 0.3 for _ in range(6)]
    dense = [rng.random((2, 8, 8)).astype(np.float32) for _ in range(6)]
    labels = [rng.integers(0, 4, (8, 8)).astype(np.uint8) for _ in range(6)]
    part = slice(0, 2) if rank == 0 else slice(2, 6)  # unequal shards
    box, mask, dm = MaxBoxAcc(), PxAP(), DenseMIoU(4)
    box.update(maps[part], boxes[part])
    mask.update(maps[part], fgs[part])
    dm.update(dense[part], [[0, 2]] * len(dense[part]), labels[part])
    before = box.state_dict()
    states = {}
    for name, metric in (("box", box), ("mask", mask), ("dense", dm)):
        for k, v in metric.sync().state_dict().items():
            states[name + "." + k] = v
    assert all(np.array_equal(before[k], v) for k, v in box.state_dict().items()), "sync changed self"
    np.savez(out, **states)
    dist.destroy_process_group()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gloo_two_process_sync(tmp_path: Path):
    port = str(_free_port())
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(r), port, str(tmp_path / f"r{r}.npz")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out.decode()[-3000:]
    r0, r1 = (np.load(tmp_path / f"r{r}.npz") for r in range(2))

    rng = np.random.default_rng(0)
    maps = [rng.random((16, 16)).astype(np.float32) for _ in range(6)]
    fgs = [rng.random((16, 16)) < 0.3 for _ in range(6)]
    dense = [rng.random((2, 8, 8)).astype(np.float32) for _ in range(6)]
    labels = [rng.integers(0, 4, (8, 8)).astype(np.uint8) for _ in range(6)]
    box, mask, dm = MaxBoxAcc(), PxAP(), DenseMIoU(4)
    box.update(maps, [np.array([[2, 3, 9, 12]])] * 6)
    mask.update(maps, fgs)
    dm.update(dense, [[0, 2]] * 6, labels)
    for name, metric in (("box", box), ("mask", mask), ("dense", dm)):
        for k, v in metric.state_dict().items():
            assert np.array_equal(r0[f"{name}.{k}"], v), (name, k)
            assert np.array_equal(r1[f"{name}.{k}"], v), (name, k)
