"""TeD-Loc (methods/tedloc/) on random-init micro zoo models: anchors, sampling, losses, training, inference."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import wsolbench.methods.tedloc.method as T
from wsolbench.localizer import LocalizerOutput
from wsolbench.methods.tedloc import losses as L, model as M, sampling as S
from wsolbench.datasets.base import Sample, WSOLDataset
from wsolbench.config import load_method_config

NAMES = ["star", "heart", "ring", "cross"]
MICRO = ["encoder.source=zoo-random", "encoder.scale=micro", "clip.source=zoo-random", "clip.scale=micro",
         "input_size=32", "pseudo_labels.clip_input_size=32", "decoder.hidden_dim=16", "train.resize_size=36",
         "train.crop_size=32", "train.batch_size=4", "train.epochs=1", "sampling.per_step=8"]


def micro_cfg(*extra: str) -> dict:
    return load_method_config("tedloc", "tiny", "cub", MICRO + list(extra))


@pytest.fixture
def method(isolated_env):
    torch.manual_seed(0)
    return T.TeDLoc.from_config(micro_cfg(), class_names=NAMES)


class _Scenes(WSOLDataset):
    """A minimal WSOL dataset of synthetic single-object scenes written as PNG files."""

    registry_name = "test-scenes"

    def __init__(self, root: Path, n: int = 8, size: int = 48) -> None:
        from PIL import Image

        from wsolbench.datasets.synthetic import render_scene

        self.root = root
        self.class_names = list(NAMES)
        self.samples = []
        root.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            scene = render_scene(100 + i, size=(size, size), classes=[i % len(NAMES)])
            path = root / f"img{i}.png"
            Image.fromarray(scene.image).save(path)
            o = scene.objects[0]
            self.samples.append(Sample(image_id=f"img{i}.png", image_path=path, size=(size, size),
                                       labels=(o.class_index,), boxes=o.box[None].astype(np.float32)))


# ------------------------------------------------------------------------------------------ anchors
def test_qr_anchors_are_orthonormal_and_keep_class_order():
    torch.manual_seed(0)
    text = F.normalize(torch.randn(5, 16) + 2.0, dim=1)  # correlated, like CLIP class embeddings
    a = M.orthogonalize_anchors(text)
    torch.testing.assert_close(a @ a.T, torch.eye(5), atol=1e-5, rtol=0)
    r = a @ text.T  # anchor k · t_j: Gram–Schmidt in class order → upper triangular, positive diagonal
    assert torch.all(torch.diagonal(r) > 0)
    torch.testing.assert_close(torch.tril(r, -1), torch.zeros(5, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(a[0], text[0], atol=1e-5, rtol=0)  # the first class is unchanged
    assert torch.equal(torch.argmax(r, dim=0)[:1], torch.tensor([0]))
    perm = [2, 0, 1, 4, 3]  # the anchors follow the class order given
    torch.testing.assert_close(M.orthogonalize_anchors(text[perm])[0], text[2], atol=1e-5, rtol=0)


def test_more_classes_than_dimensions_whitens_with_a_warning():
    text = torch.randn(12, 4)
    with pytest.warns(RuntimeWarning, match="orthonormal"):
        a = M.orthogonalize_anchors(text)
    torch.testing.assert_close(a.norm(dim=1), torch.ones(12), atol=1e-5, rtol=0)


def test_anchors_from_clip_and_the_orthogonalisation_switch(method):
    clip, tok = method.load_clip()
    a = method.build_anchors(clip, tok)
    torch.testing.assert_close(a @ a.T, torch.eye(4), atol=1e-5, rtol=0)
    assert torch.equal(method.head.anchors, a) and method.head.anchors_ready.item() == 1
    raw = T.TeDLoc.from_config(micro_cfg("anchors.orthogonalize=false"), class_names=NAMES)
    b = raw.build_anchors(clip, tok)
    torch.testing.assert_close(b.norm(dim=1), torch.ones(4))
    assert not torch.allclose(b @ b.T, torch.eye(4), atol=1e-3)  # CLIP class embeddings are correlated
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=0)
    assert "head.anchors" in method.state_dict()


# ----------------------------------------------------------------------------------- pseudo-label sampling
def _square_cam(n: int = 20) -> np.ndarray:
    cam = np.full((n, n), 0.05, np.float32)
    cam[5:13, 6:14] = 0.9
    cam[7:11, 8:12] = 1.0
    cam[0, 0] = 0.0
    return cam + np.linspace(0, 0.01, n * n, dtype=np.float32).reshape(n, n)


def test_otsu_candidates_lie_in_the_right_regions():
    cam = _square_cam()
    region, core = S.otsu_regions(cam, erosion=3)
    assert region[5:13, 6:14].all() and region.sum() == 64
    assert core.sum() == 36 and core[6:12, 7:13].all()  # 3×3 erosion of the 8×8 square
    fg, bg = S.fg_bg_candidates(cam, n_fg=10, n_bg=30, erosion=3, bg_fraction=1.0)
    assert len(fg) == 10 and len(bg) == 30
    inside = np.zeros_like(region)
    inside[5:13, 6:14] = True
    assert core.ravel()[fg].all()
    assert not inside.ravel()[bg].any()
    assert cam.ravel()[fg].min() >= cam.ravel()[np.flatnonzero(core)].max() - 0.2  # the top activations
    assert bg[0] == 0  # the lowest cell first
    fg_all, bg_all = S.fg_bg_candidates(cam, 0, 0, 1, 1.0)  # 0 = every cell of the sets
    assert len(fg_all) == 64 and len(bg_all) == 400 - 64


def test_background_comes_from_the_lowest_fraction_and_the_rest_is_unlabelled():
    """F-CAM/DiPS: BG only among the lowest 20% of cells; top-n⁺ / bottom-n⁻ keep the extremes; every other
    cell is in neither set. The paper profile's config states these defaults."""
    cam = _square_cam()  # 400 cells: 64 in the Otsu region, 336 below it
    fg, bg = S.fg_bg_candidates(cam, 0, 0, 1, 0.2)
    assert len(fg) == 64 and len(bg) == 80  # the lowest 20% of 400 cells, all outside the region
    assert cam.ravel()[bg].max() <= np.sort(cam.ravel())[79]
    labelled = np.zeros(400, bool)
    labelled[fg] = labelled[bg] = True
    assert (~labelled).sum() == 400 - 64 - 80  # unlabelled: the middle of the map
    top, bottom = S.fg_bg_candidates(cam, 5, 7, 1, 0.2)
    np.testing.assert_array_equal(top, fg[:5])  # the n⁺ highest, highest first
    np.testing.assert_array_equal(bottom, bg[:7])  # the n⁻ lowest, lowest first
    assert cam.ravel()[top].min() >= np.sort(cam.ravel()[fg])[-5]
    assert cam.ravel()[bottom].max() <= np.sort(cam.ravel())[6]
    wide = np.zeros((10, 10), np.float32)
    wide[:, 2:] = np.linspace(0.5, 1, 80).reshape(10, 8)  # FG covers 80% of the map ...
    fg_w, bg_w = S.fg_bg_candidates(wide, 0, 0, 1, 0.5)
    assert set(bg_w.tolist()) <= set(np.flatnonzero(wide.ravel() == 0).tolist())  # ... BG stays outside it
    with pytest.raises(ValueError, match="bg_fraction"):
        S.fg_bg_candidates(cam, 0, 0, 1, 0.0)
    paper = load_method_config("tedloc", "paper", "cub")["sampling"]
    assert paper["bg_fraction"] == 0.2


def test_balanced_sampling_resamples_and_pads():
    cam = _square_cam()
    fg, bg = S.fg_bg_candidates(cam, n_fg=12, n_bg=0, erosion=1, bg_fraction=1.0)
    g = torch.Generator().manual_seed(0)
    f1, b1 = S.sample_balanced(fg, bg, 8, g)
    assert (f1 >= 0).sum() == (b1 >= 0).sum() == 8
    assert set(f1.tolist()) <= set(fg.tolist()) and set(b1.tolist()) <= set(bg.tolist())
    f2, _ = S.sample_balanced(fg, bg, 8, g)
    assert set(f1.tolist()) != set(f2.tolist())  # re-sampled at every step
    f3, b3 = S.sample_balanced(fg, bg, 20, g)  # fewer FG candidates than asked: still equal numbers
    assert (f3 >= 0).sum() == (b3 >= 0).sum() == 12 and (f3 == -1).sum() == 8
    flat = np.zeros((10, 10), np.float32)  # constant map: no FG, nothing sampled
    fg0, bg0 = S.fg_bg_candidates(flat, 0, 0, 1, 0.2)
    assert len(fg0) == len(bg0) == 0
    f4, b4 = S.sample_balanced(fg0, bg0, 4)
    assert (f4 == -1).all() and (b4 == -1).all()
    assert S.erosion_on_grid(11, 224, 64) == 3 and S.erosion_on_grid(11, 224, 224) == 11
    assert S.erosion_on_grid(1, 224, 64) == 1


# ----------------------------------------------------------------------------------------- model / losses
def test_h_is_the_g_weighted_mean_of_z():
    torch.manual_seed(0)
    z = torch.randn(2, 6, 4, 5)
    g_logit = torch.randn(2, 1, 4, 5)
    h = M.global_embedding(z, g_logit)
    p = torch.sigmoid(g_logit)
    manual = torch.stack([(z[b] * p[b]).sum((1, 2)) / p[b].sum() for b in range(2)])
    torch.testing.assert_close(h, manual, rtol=1e-5, atol=1e-6)
    big = torch.full((1, 1, 4, 5), -30.0)
    big[0, 0, 1, 2] = 30.0  # g ≈ one-hot → h ≈ that cell's z
    torch.testing.assert_close(M.global_embedding(z[:1], big), z[:1, :, 1, 2], rtol=1e-4, atol=1e-4)


def _loss_setup(scale: float):
    anchors = torch.eye(3, 8)
    head_scores = lambda v: v @ anchors.T  # noqa: E731
    b, hw = 2, (4, 4)
    labels = torch.tensor([1, 2])
    z = torch.zeros(b, 8, *hw)
    g = torch.full((b, 1, *hw), -scale)  # unsampled cells are background too
    fg = torch.tensor([[0, 1, -1], [5, 6, 7]])
    bg = torch.tensor([[15, 14, -1], [10, 11, 12]])
    for i in range(b):
        for c in fg[i][fg[i] >= 0]:
            z[i, :, c // 4, c % 4] = scale * anchors[labels[i]]
            g[i, 0, c // 4, c % 4] = scale
    out = {"z": z, "g_logit": g, "h": M.global_embedding(z, g)}
    return out, labels, fg, bg, head_scores


def test_each_loss_is_minimal_where_it_should_be():
    cfg = {"kd": True, "pcl": True, "icl": True, "lambda_kd": 1.0, "lambda_pcl": 1.0, "lambda_icl": 1.0}
    good = L.tedloc_losses(*_loss_setup(40.0), cfg)
    for k in ("l_kd", "p_cl", "i_cl", "loss"):
        assert float(good[k]) < 1e-5, (k, float(good[k]))
    weak = L.tedloc_losses(*_loss_setup(0.5), cfg)
    for k in ("l_kd", "p_cl", "i_cl"):
        assert float(weak[k]) > 0.1
    out, labels, fg, bg, scores = _loss_setup(40.0)
    wrong = L.tedloc_losses(out, torch.tensor([0, 0]), fg, bg, scores, cfg)  # wrong class: KD and I_CL grow
    assert float(wrong["l_kd"]) > 10 and float(wrong["i_cl"]) > 10 and float(wrong["p_cl"]) < 1e-6
    flipped = L.tedloc_losses(out, labels, bg, fg, scores, cfg)  # FG/BG swapped: P_CL grows
    assert float(flipped["p_cl"]) > 10
    # switches and λs: the total is the weighted sum of the enabled terms
    w = L.tedloc_losses(*_loss_setup(0.5), {"kd": True, "pcl": False, "icl": True, "lambda_kd": 0.5,
                                            "lambda_icl": 0.25})
    torch.testing.assert_close(w["loss"], 0.5 * w["l_kd"] + 0.25 * w["i_cl"])
    none = torch.full((2, 3), -1)  # no sampled cells: the cell losses vanish, I_CL remains
    e = L.tedloc_losses(out, labels, none, none, scores, cfg)
    assert float(e["l_kd"]) == 0 and float(e["p_cl"]) == 0 and torch.isfinite(e["loss"])


def test_one_training_step_lowers_the_loss(method):
    clip, tok = method.load_clip()
    method.build_anchors(clip, tok)
    torch.manual_seed(0)
    n = method.grid[0] * method.grid[1]
    batch = {"image": torch.randn(4, 3, 32, 32), "label": torch.tensor([0, 1, 2, 3]),
             "fg_idx": torch.randint(0, n // 2, (4, 8)), "bg_idx": torch.randint(n // 2, n, (4, 8))}
    opt, _ = method.make_optimizer()
    method.head.train()
    before = method.training_step(batch)
    opt.zero_grad()
    before["loss"].backward()
    opt.step()
    with torch.no_grad():
        after = method.training_step(batch)
    assert after["loss"].item() < before["loss"].item()
    assert all(p.grad is None for p in method.encoder.parameters())  # the encoder stays frozen


def test_inference_needs_no_labels_and_save_load_needs_no_text_encoder(method, tmp_path, monkeypatch):
    from PIL import Image

    clip, tok = method.load_clip()
    method.build_anchors(clip, tok)
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)) for _ in range(3)]
    out = method.localize(imgs)
    h, w = method.grid
    assert out.maps.shape == (3, 1, h, w) and out.logits.shape == (3, 4)
    assert out.classes == [[int(c)] for c in out.logits.argmax(1)]
    assert float(out.maps.min()) >= 0 and float(out.maps.max()) <= 1  # g is a probability
    assert out.extras["zp_dot_t"].shape == (3, 1, h, w)
    gt = method.localize(imgs, classes=[[0, 3]] * 3)  # GT-known: one channel per queried class
    assert gt.maps.shape == (3, 2, h, w) and gt.extras["zp_dot_t"].shape == (3, 2, h, w)
    torch.testing.assert_close(gt.maps[:, 0], gt.maps[:, 1])  # g is class-agnostic
    torch.testing.assert_close(gt.logits, out.logits)
    method.save(tmp_path / "ckpt")
    monkeypatch.setattr(T.TeDLoc, "load_clip", lambda self: pytest.fail("inference must not load CLIP"))
    again = T.TeDLoc.load(tmp_path / "ckpt")
    out2 = again.localize(imgs)
    torch.testing.assert_close(out2.maps, out.maps)
    torch.testing.assert_close(out2.logits, out.logits)
    up = T.TeDLoc.from_config(micro_cfg("inference.map=zp_dot_t", "inference.map_size=32"), class_names=NAMES)
    up.load_state_dict(method.state_dict())
    o3 = up.localize(imgs)
    assert o3.maps.shape == (3, 1, 32, 32) and set(o3.extras) == {"g"}


def test_fit_caches_pseudo_labels_and_resumes(isolated_env, monkeypatch):
    from wsolbench.maps.clip_gradcam import ClipGradCAM

    data = _Scenes(isolated_env / "scenes", n=8)
    torch.manual_seed(0)
    m = T.TeDLoc.from_config(micro_cfg("train.epochs=2"), class_names=NAMES)
    calls = []
    real_call = ClipGradCAM.__call__
    monkeypatch.setattr(ClipGradCAM, "__call__", lambda self, *a, **k: calls.append(1) or real_call(self, *a, **k))
    res = m.fit(data, out_dir=isolated_env / "run", progress=False)
    assert len(res["history"]) == 2 and all(np.isfinite(r["loss"]) for r in res["history"])
    assert {"l_kd", "p_cl", "i_cl"} <= set(res["history"][0])
    files = sorted(Path(res["pseudo_label_dir"]).rglob("*.npy"))
    assert len(files) == 8 and (Path(res["pseudo_label_dir"]) / "settings.json").exists()
    assert str(files[0]).startswith(str(isolated_env / "cache"))
    cam = np.load(files[0])
    assert cam.dtype == np.float16 and cam.shape == (4, 4) and 0 <= cam.min() and cam.max() <= 1
    assert m.head.trained.item() == 1 and (isolated_env / "run" / "last.pt").exists()
    n_calls = len(calls)
    # a rerun reuses every cached map; resume=True with all epochs done trains nothing more
    m2 = T.TeDLoc.from_config(micro_cfg("train.epochs=2"), class_names=NAMES)
    res2 = m2.fit(data, out_dir=isolated_env / "run", resume=True, progress=False)
    assert len(calls) == n_calls
    assert res2["history"] == res["history"]
    for k, v in m.head.state_dict().items():
        torch.testing.assert_close(m2.head.state_dict()[k], v)
    # other prompt settings → another cache folder
    m3 = T.TeDLoc.from_config(micro_cfg("train.epochs=1", 'pseudo_labels.prompt=["a drawing of a {}."]'),
                              class_names=NAMES)
    res3 = m3.fit(data, out_dir=isolated_env / "run3", progress=False)
    assert res3["pseudo_label_dir"] != res["pseudo_label_dir"] and len(calls) > n_calls


def test_train_set_items_are_balanced_and_augmented_together(method, isolated_env):
    data = _Scenes(isolated_env / "scenes", n=2)
    cam = np.zeros((4, 4), np.float32)
    cam[:, :2] = 1.0  # left half is FG
    cache = isolated_env / "c.npy"
    np.save(cache, cam.astype(np.float16))
    ts = method.make_train_set(data, [cache, cache])
    torch.manual_seed(0)
    seen_flip = set()
    for _ in range(6):
        item = ts[0]
        assert item["image"].shape == (3, 32, 32)
        f, b = item["fg_idx"], item["bg_idx"]
        assert (f >= 0).sum() == (b >= 0).sum() > 0
        cols_f = (f[f >= 0] % method.grid[1]).float().mean()
        cols_b = (b[b >= 0] % method.grid[1]).float().mean()
        seen_flip.add(bool(cols_f > cols_b))  # FG left of BG, or right after a flip
    assert seen_flip == {True, False}


def test_a_partial_config_is_completed_from_the_schema_yaml(isolated_env):
    """tedloc.yaml is the one source of defaults: a notebook's partial config trains with the YAML's per_step 32,
    erosion 11 px (scaled to the z_p grid), bg_fraction 0.2, 50 cosine epochs and step_size 15, not with values
    written again in the code."""
    partial = {"input_size": 32, "encoder": {"source": "zoo-random", "scale": "micro"},
               "clip": {"source": "zoo-random", "scale": "micro"}, "decoder": {"hidden_dim": 16},
               "train": {"resize_size": 36, "crop_size": 32}}
    m = T.TeDLoc(partial, class_names=NAMES)
    paper = load_method_config("tedloc", "paper")
    sampling, train = paper["sampling"], paper["train"]
    assert (sampling["per_step"], sampling["erosion_kernel"], train["epochs"]) == (32, 11, 50)
    ts = m.make_train_set(_Scenes(isolated_env / "scenes", n=1), [isolated_env / "unused.npy"])
    assert (ts.per_step, ts.bg_fraction, ts.n_fg, ts.n_bg) == (32, 0.2, 0, 0)
    assert m.grid == (16, 16) and ts.erosion == 7  # 11 px at 32 px on the 16×16 z_p grid (4×4 micro ViT, 2 blocks)
    opt, sched = m.make_optimizer()
    assert sched.T_max == 50 and opt.defaults["lr"] == 0.01 and opt.defaults["momentum"] == 0.9
    m.config["train"]["scheduler"] = "step"
    assert m.make_optimizer()[1].step_size == 15
    m.config["selection"]["every"] = 0
    with pytest.raises(ValueError, match="selection.every must be an integer of at least 1"):
        m.fit(_Scenes(isolated_env / "scenes", n=2), progress=False)


def test_paper_profile_config_and_missing_weights(isolated_env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cub = load_method_config("tedloc", "paper", "cub")
    ils = load_method_config("tedloc", "paper", "ilsvrc")
    assert cub["encoder"]["source"] == "timm" and cub["encoder"]["variant"] == "eva01-l-196"
    assert M.encoder_name(cub["encoder"]) == "eva_large_patch14_196.in22k_ft_in22k_in1k"  # EVA-01, as the paper cites
    assert M.encoder_name({"name": None, "variant": "eva02-l-448"}).startswith("eva02_large_patch14_448")
    named = {"variant": "eva02-l-448", "name": "vit_large_patch14_clip_224"}
    assert M.encoder_name(named) == "vit_large_patch14_clip_224"  # a timm name wins over the variant
    with pytest.raises(ValueError, match="encoder.variant must be one of eva01-l-196"):
        M.encoder_name({"name": None, "variant": "eva-l"})
    assert cub["selection"]["metric"] == "maxboxacc" and cub["selection"]["map_size"] == 256
    assert cub["clip"]["name"] == "ViT-B-16" and cub["train"]["optimizer"] == "sgd"
    assert (cub["train"]["epochs"], cub["train"]["batch_size"]) == (50, 16)
    assert (ils["train"]["epochs"], ils["train"]["batch_size"]) == (10, 32)
    assert cub["anchors"]["orthogonalize"] is True and cub["input_size"] == 224
    from wsolbench.weights import MissingWeightsError

    with pytest.raises(MissingWeightsError, match="weights fetch"):
        T.TeDLoc.from_config(cub, class_names=NAMES)
    bad = load_method_config("tedloc", "paper", "cub", ["encoder.weights=/nonexistent/eva.safetensors"])
    with pytest.raises(MissingWeightsError, match="explicit path"):
        T.TeDLoc.from_config(bad, class_names=NAMES)


def test_registered_and_checks(method):
    import wsolbench

    assert wsolbench.registry.get_method_class("tedloc") is T.TeDLoc
    assert T.TeDLoc.needs_training and "single" in {c.value for c in T.TeDLoc.capabilities}
    bare = T.TeDLoc.from_config(micro_cfg(), class_names=[])  # e.g. for `wsolbench profile`
    assert bare.head.anchors.shape[0] == 1
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        method.localize([np.zeros((32, 32, 3), np.uint8)])
    assert any("no anchors" in str(x.message) for x in w)


@pytest.mark.filterwarnings("ignore:TeD-Loc has no anchors")
def test_profile_counts_the_encoder_and_head(method):
    from wsolbench.profiling import profile_method

    r = profile_method(method, input_size=32, n_images=2, device="cpu", warmup=1)
    enc = sum(p.numel() for p in method.encoder.parameters())
    head = sum(p.numel() for p in method.head.parameters())
    assert r["params_inference"] == r["params_total"] == enc + head
    assert r["ms_per_image"] > 0


@pytest.mark.filterwarnings("ignore:TeD-Loc has no anchors")
def test_pseudo_label_maps_as_a_diagnostic_variant(isolated_env):
    m = T.TeDLoc.from_config(micro_cfg("inference.report_pseudo_labels=true"), class_names=NAMES)
    imgs = [np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8) for i in range(2)]
    out = m.localize(imgs, classes=[1, 2])
    pl = out.extras["clip_gradcam"]
    assert pl.shape == out.maps.shape and float(pl.min()) >= 0 and float(pl.max()) <= 1 + 1e-6
    native = T.TeDLoc.from_config(micro_cfg("inference.report_pseudo_labels=true",
                                            "pseudo_labels.clip_input_size=null"), class_names=NAMES)
    assert native.localize(imgs, classes=[1, 2]).extras["clip_gradcam"].shape == out.maps.shape


@pytest.mark.slow
def test_paper_architecture_loads_a_448_checkpoint_at_224(isolated_env):
    """The paper profile end to end on real-size modules: an EVA-02 ViT-L checkpoint saved at its native 448 px
    (random weights standing in for the real file) loads through the weights resolver at 224 px."""
    import timm
    from safetensors.torch import save_file

    name = "eva02_large_patch14_448.mim_m38m_ft_in22k_in1k"
    ref = timm.create_model(name, pretrained=False, num_classes=0)
    file = isolated_env / "eva.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(file))
    cfg = load_method_config("tedloc", "paper", "cub", ["encoder.variant=eva02-l-448", f"encoder.weights={file}"])
    m = T.TeDLoc.from_config(cfg, class_names=[f"c{i}" for i in range(200)])
    assert m.encoder.grid == (16, 16) and m.grid == (64, 64) and m.text_dim == 512
    got, want = m.encoder.model.state_dict(), ref.state_dict()
    for key in ("patch_embed.proj.weight", "blocks.3.attn.proj.weight", "blocks.23.mlp.fc2.weight"):
        torch.testing.assert_close(got[key], want[key])
    assert got["pos_embed"].shape[1] == 1 + 16 * 16 and want["pos_embed"].shape[1] == 1 + 32 * 32
    assert m.mean == tuple(float(v) for v in ref.pretrained_cfg["mean"])
    feats = m.encoder(torch.zeros(1, 3, 224, 224))
    assert feats.shape == (1, 1024, 16, 16)


# ------------------------------------------------------------------------------- background words
def test_background_words_that_name_a_class_are_removed_on_real_imagenet_names():
    """CLIP-ES's VOC list on ILSVRC: words inside class names or synonyms ("computer keyboard", "crash helmet",
    "street sign", "suspension bridge", "valley, vale", "lakeside", "seashore") go, the others stay."""
    from wsolbench.maps.clip_gradcam import CLIP_ES_BACKGROUND, filter_background_words
    from wsolbench.datasets.ilsvrc import timm_imagenet_mapping

    mapping = timm_imagenet_mapping()
    if mapping is None:
        pytest.skip("timm's ImageNet synset table is not installed")
    _, synonyms = mapping
    names = [s[0] for s in synonyms]
    kept, removed = filter_background_words(CLIP_ES_BACKGROUND, names, synonyms)
    assert {"keyboard", "helmet", "sign", "bridge", "valley", "lake", "sea", "tree", "house", "rock"} <= set(removed)
    assert kept == ["sky", "railway", "railroad", "cloud", "road"]  # "husky" and "rocky" are not "sky"/"rock" scenes
    names_only, _ = filter_background_words(CLIP_ES_BACKGROUND, names)
    assert "ocean" in names_only  # only a synonym ("liner, ocean liner") names it: synonyms matter
    assert filter_background_words(["grass", "sky"], ["001.Grasshopper_Sparrow"]) == (["sky"], ["grass"])


def test_fit_uses_the_filtered_words_from_the_training_set_synonyms(isolated_env, monkeypatch):
    data = _Scenes(isolated_env / "scenes", n=4)
    data._class_synonyms = [("star", "sea star"), ("heart",), ("ring",), ("cross", "crossroad")]
    m = T.TeDLoc.from_config(micro_cfg('pseudo_labels.background_words=[sea, sky, road, ring, cloud]'),
                             class_names=NAMES)
    class Stop(Exception):
        pass

    def stop(self, *args):
        raise Stop

    monkeypatch.setattr(T.TeDLoc, "make_train_set", stop)
    with pytest.raises(Stop):  # stop after the pseudo-labels
        m.fit(data, out_dir=isolated_env / "run", progress=False)
    assert m.background_words() == (["sky", "cloud"], ["sea", "road", "ring"])  # synonyms "sea star", "crossroad"
    settings = next((isolated_env / "cache").rglob("settings.json"))
    import json

    assert json.loads(settings.read_text())["background_words"] == ["sky", "cloud"]
    off = T.TeDLoc.from_config(micro_cfg('pseudo_labels.background_words=[sea, ring]',
                                         "pseudo_labels.background_filter=none"), class_names=NAMES)
    assert off.background_words() == (["sea", "ring"], [])


# ------------------------------------------------------------------------------- model selection
def test_box_accuracy_scores_the_g_maps_against_the_boxes(method, isolated_env, monkeypatch):
    """Maps equal to each GT box score 100; maps in the opposite corner score 0 (boxes scaled from each
    image's original size to the map size)."""
    data = _Scenes(isolated_env / "scenes", n=4)

    def boxes_as_maps(flip):
        def localize(self, images, classes=None, texts=None, meta=None):
            maps = torch.zeros(len(images), 1, 48, 48)
            for i, img in enumerate(images):
                sample = next(s for s in data.samples if np.array_equal(np.asarray(s.load_image()), np.asarray(img)))
                x0, y0, x1, y1 = (int(v) for v in sample.boxes[0])
                if flip:  # a small square in the corner farthest from the box
                    far_y, far_x = (0 if y0 + y1 > 48 else 44), (0 if x0 + x1 > 48 else 44)
                    maps[i, 0, far_y:far_y + 4, far_x:far_x + 4] = 1.0
                else:
                    maps[i, 0, y0:y1 + 1, x0:x1 + 1] = 1.0
            return LocalizerOutput(maps=maps, classes=[[c] for c in classes])
        return localize

    monkeypatch.setattr(T.TeDLoc, "localize", boxes_as_maps(False))
    assert method.box_accuracy(data, "maxboxacc", 64) == 100.0
    assert method.box_accuracy(data, "maxboxacc_v2", 64) == 100.0
    monkeypatch.setattr(T.TeDLoc, "localize", boxes_as_maps(True))
    assert method.box_accuracy(data, "maxboxacc", 64) == 0.0
    with pytest.raises(ValueError, match="selection.metric"):
        method.box_accuracy(data, "top1", 64)


def test_fit_keeps_the_head_of_the_best_val_epoch_and_records_it(isolated_env, monkeypatch):
    data = _Scenes(isolated_env / "scenes", n=8)
    val = _Scenes(isolated_env / "val", n=4)
    scores, heads = iter([10.0, 30.0, 20.0]), []

    def fake_score(self, dataset, metric, map_size, batch_size=32):
        assert dataset is val and metric == "maxboxacc" and map_size == 256
        heads.append({k: v.clone() for k, v in self.head.state_dict().items()})
        return next(scores)

    monkeypatch.setattr(T.TeDLoc, "box_accuracy", fake_score)
    m = T.TeDLoc.from_config(micro_cfg("train.epochs=3"), class_names=NAMES)
    res = m.fit(data, val_data=val, out_dir=isolated_env / "run", progress=False)
    assert [r["val_maxboxacc"] for r in res["history"]] == [10.0, 30.0, 20.0]
    assert res["selection"]["epoch"] == 2 and res["selection"]["value"] == 30.0
    import json

    assert json.loads((isolated_env / "run" / "selection.json").read_text())["epoch"] == 2
    for k, v in m.head.state_dict().items():
        if k != "trained":
            torch.testing.assert_close(v, heads[1][k])
    assert any(not torch.equal(v, heads[2][k]) for k, v in m.head.state_dict().items() if v.is_floating_point())
    # a resumed run (all epochs done) selects the same epoch from the saved best head
    m2 = T.TeDLoc.from_config(micro_cfg("train.epochs=3"), class_names=NAMES)
    res2 = m2.fit(data, val_data=val, out_dir=isolated_env / "run", resume=True, progress=False)
    assert res2["selection"]["epoch"] == 2
    for k, v in m2.head.state_dict().items():
        torch.testing.assert_close(v, m.head.state_dict()[k])
    # without a val split: the last epoch, said so
    m3 = T.TeDLoc.from_config(micro_cfg("train.epochs=1"), class_names=NAMES)
    assert m3.fit(data, progress=False)["selection"] == {"metric": "last", "epoch": 1, "reason": "no val split given"}


def test_reporting_the_pseudo_labels_does_not_change_what_is_trained(isolated_env):
    """inference.report_pseudo_labels is a diagnostic: the val selection's localize calls compute it, and loading
    and running the CLIP Grad-CAM must not draw from the global RNG that the training's pixel sampling uses (it did:
    TeD-Loc tiny scored 51.5 with the flag and 59.5 without, on the same world)."""
    data, val = _Scenes(isolated_env / "scenes", n=8), _Scenes(isolated_env / "val", n=4)
    heads = []
    for flag in ("false", "true"):
        m = T.TeDLoc.from_config(micro_cfg("train.epochs=2", f"inference.report_pseudo_labels={flag}"),
                                 class_names=NAMES)
        res = m.fit(data, val_data=val, out_dir=isolated_env / f"run-{flag}", progress=False)
        heads.append((m.head.state_dict(), [r["val_maxboxacc"] for r in res["history"]]))
    assert heads[0][1] == heads[1][1]
    for k, v in heads[0][0].items():
        torch.testing.assert_close(v, heads[1][0][k], rtol=0, atol=0)


def test_openai_clip_comes_from_the_shared_loader(method, monkeypatch):
    """TeD-Loc's CLIP (anchors, pseudo-labels) is built by wsolbench.weights.load_open_clip, the one loader
    that gives OpenAI weights QuickGELU; a name outside the catalogue is a one-line error, not a download."""
    from wsolbench import weights

    calls = []
    monkeypatch.setattr(weights, "load_open_clip", lambda *a, **k: calls.append((a, k)) or ("model", "tok"))
    method.config["clip"] = {**method.config["clip"], "source": "open_clip", "name": "ViT-B-16",
                             "pretrained": "openai", "weights": None}
    assert method.load_clip() == ("model", "tok")
    assert calls == [(("ViT-B-16", "openai"), {"path": None, "device": "cpu"})]
    def unknown(*args, **kwargs):
        raise KeyError("unknown model")

    monkeypatch.setattr(weights, "load_open_clip", unknown)
    with pytest.raises(ValueError, match="clip.name=ViT-B-16 clip.pretrained=openai: unknown model"):
        method.load_clip()
