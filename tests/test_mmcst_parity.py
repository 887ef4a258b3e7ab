"""MMCST against the official MCTformer code (../shared/fixtures/parity/mctformer, see its README).

MCTformer-V1 and -V2 checkpoints are filled from ``keys.json`` with the fixture's ``recipe.py`` and loaded through
the paper profile's public path (``--checkpoint FILE`` → ``MMCST.load_foreign``); every stage the README stores is
compared within its stated tolerance: class scores, class-to-patch attention, V2's fused map and patch scores,
the refined maps, the final per-class maps (native size, 3 scales × flip) and the mIoU at the stored thresholds.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from wsolbench.config import load_method_config
from wsolbench.methods.mmcst.inference import mctformer_inputs
from wsolbench.methods.mmcst.method import MMCST

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# README "Suggested tolerances for a float32 implementation on another machine"
TOL = {"final": 2e-3, "scores": 1e-3, "c2p_attn": 2e-4, "v1/refined": 2e-4, "v2/refined": 5e-2, "fused": 5e-2,
       "patch_scores": 5e-2, "miou": 0.05}
# the paper profile read as MCTformer: DeiT-S, class tokens only (V1 "attention only"); V2 adds its class head
OVERRIDES = {
    "v1": ["model.backbone.name=deit-s16", "model.text_tokens=false", "model.class_patch=false", "infer.map=attn"],
    "v2": ["model.backbone.name=deit-s16", "model.text_tokens=false", "model.class_patch=false",
           "model.patch_cam=true", "infer.map=patchcam"],
}


@pytest.fixture(scope="module")
def fixture_dir(parity_fixture):
    return parity_fixture("mctformer")


@pytest.fixture(scope="module")
def expected(fixture_dir):
    with np.load(fixture_dir / "expected.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def class_names(fixture_dir):
    return json.loads((fixture_dir / "inputs" / "labels.json").read_text())["class_names"]


@pytest.fixture(scope="module")
def checkpoints(fixture_dir, parity_recipe, tmp_path_factory):
    """{'v1': path, 'v2': path}: the official checkpoint format, {'model': state_dict}, with the recipe's weights."""
    recipe = parity_recipe
    keys = json.loads((fixture_dir / "keys.json").read_text())
    out = tmp_path_factory.mktemp("mctformer")
    paths = {}
    for v in ("v1", "v2"):
        paths[v] = out / f"mctformer_{v}.pth"
        torch.save({"model": recipe.state_dict_for(keys[v], keys["seed"], keys["gain"])}, paths[v])
    return paths


def _load(version, checkpoints, class_names) -> MMCST:
    cfg = load_method_config("mmcst", "paper", "voc", OVERRIDES[version])
    return MMCST.load_foreign(checkpoints[version], cfg, class_names=class_names)


def _close(name, got, want, tol):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    err = float(np.abs(got - want).max())
    assert err <= tol, f"{name}: max |Δ| {err:.3g} > {tol}"


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_mctformer_stages_and_miou(version, checkpoints, expected, fixture_dir, class_names):
    from wsolbench.metrics import DenseMIoU, normalize_per_class

    m = _load(version, checkpoints, class_names)
    report = m.load_report
    assert report.layout == f"mctformer-{version}" and report.missing == report.unexpected == []
    # V1's unused Linear head is dropped with its reason; V2's 3x3-conv class head is loaded
    assert ("head.weight" in report.ignored) == (version == "v1")
    assert ("head.weight" in report.loaded) == (version == "v2")
    metric = DenseMIoU(num_classes=21, bg_thresholds=expected["thresholds"])
    for name in expected["names"]:
        name = str(name)
        img = Image.open(fixture_dir / "inputs" / f"{name}.png").convert("RGB")
        passes, hw = mctformer_inputs(img, [float(s) for s in expected["scales"]], True, m.mean, m.std)
        assert [tuple(x.shape[-2:]) for x, _ in passes] == [tuple(r) for r in expected[f"input_hw/{name}"]]
        with torch.no_grad():  # the scale-1, unflipped pass, stage by stage
            out = m.model(passes[0][0], need_attn=True)
            attn = m.model.maps(out, "attn", attn_layers=3, fuse_attention=True, refine=False, relu=True)[0]
            refined = m.model.maps(out, m.icfg["map"], attn_layers=3, fuse_attention=True, refine=True, relu=True)[0]
        _close(f"{name} scores", out["logits"][0], expected[f"{version}/scores/{name}"], TOL["scores"])
        _close(f"{name} c2p_attn", attn, expected[f"{version}/c2p_attn/{name}"], TOL["c2p_attn"])
        _close(f"{name} refined", refined, expected[f"{version}/refined/{name}"], TOL[f"{version}/refined"])
        if version == "v2":
            with torch.no_grad():
                fused = m.model.maps(out, "patchcam", attn_layers=3, fuse_attention=True, refine=False,
                                     relu=True)[0]
            _close(f"{name} fused", fused, expected[f"v2/fused/{name}"], TOL["fused"])
            _close(f"{name} patch_scores", out["patch_logits"][0], expected[f"v2/patch_scores/{name}"],
                   TOL["patch_scores"])
        # the whole map generation through the public localize: all 20 maps at the image's own size
        res = m.localize([img])
        assert res.maps.shape == (1, 20, *expected["sizes_hw"][list(expected["names"]).index(name)])
        cls = [int(c) for c in expected[f"{version}/final_classes/{name}"]]
        final = normalize_per_class(res.maps[0, cls].numpy(), (hw[1], hw[0]))  # the harness's preparation
        _close(f"{name} final", final, expected[f"{version}/final/{name}"], TOL["final"])
        label = np.asarray(Image.open(fixture_dir / "inputs" / f"{name}_label.png"))
        metric.update([final], [cls], [label])
    _close("mIoU", metric.curves()["miou"], expected[f"{version}/miou"], TOL["miou"])
