"""GenPromp on micro zoo components: training touches only what it should, prompts, aggregation, checkpoints."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from wsolbench.classnames import class_text
from wsolbench.weights import local_path
from wsolbench.maps.cross_attention import AttentionLayer  # noqa: E402
from wsolbench.config import load_method_config  # noqa: E402
from wsolbench.localizer import Capability, ImageMeta  # noqa: E402

gp = importlib.import_module("wsolbench.methods.genpromp.method")
gp_prompts = importlib.import_module("wsolbench.methods.genpromp.prompts")
gp_inference = importlib.import_module("wsolbench.methods.genpromp.inference")
gp_classifier = importlib.import_module("wsolbench.methods.genpromp.classifier")
gp_train = importlib.import_module("wsolbench.methods.genpromp.train")
gp_components = importlib.import_module("wsolbench.methods.genpromp.components")
CLASSES = ["star", "heart", "ring"]
MICRO_GROUPS = [{"places": ["down", "mid", "up"], "levels": [1]}, {"places": ["up"], "levels": [0]},
                {"places": ["down"], "levels": [0]}]


def micro_config(**inference):
    cfg = load_method_config("genpromp", profile="tiny")
    cfg["classifier"]["kind"] = "none"
    cfg["model"]["zoo_scale"] = "micro"  # from_config then builds the same seeded random micro components
    cfg["model"]["image_size"] = 32
    cfg["inference"].update({"groups": MICRO_GROUPS, "map_size": 8, **inference})
    cfg["train"]["augment"].update({"resize": 32, "crop": 32})
    cfg["train"]["stage1"].update({"epochs": 1, "batch_size": 2, "grad_accum": 1, "parallel_classes": 2})
    cfg["train"]["stage2"].update({"steps": 2, "batch_size": 2, "save_steps": 1})
    return cfg


_COMPONENTS: dict = {}


def micro_components():
    """Random-init micro zoo components, built once and deep-copied (methods add tokens to the tokenizer)."""
    import copy

    if not _COMPONENTS:
        from wsolbench.zoo import create_diffusion_components

        _COMPONENTS.update(create_diffusion_components("micro"))
    return copy.deepcopy(_COMPONENTS)


def make_method(cfg=None, classes=CLASSES):
    return gp.GenPromp.from_config(cfg or micro_config(), class_names=classes, components=micro_components())


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def method():
    return make_method()


class ListDataset(list):
    class_names = CLASSES

    @property
    def num_classes(self):
        return len(self.class_names)


@pytest.fixture(scope="module")
def train_set(tmp_path_factory):
    """Two images of class 0, two of class 1, none of class 2."""
    from PIL import Image

    from wsolbench.datasets.base import Sample

    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    out = ListDataset()
    for i, c in enumerate([0, 0, 1, 1]):
        p = root / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(p)
        out.append(Sample(image_id=f"cls{c}/img{i}.png", image_path=p, size=(36, 40), labels=(c,)))
    return out


def _images(n=2, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (30, 40, 3), dtype=np.uint8) for _ in range(n)]


# ----------------------------------------------------------------------------------------------- prompts
def test_meta_token_rule(method):
    tok = method.tokenizer
    assert gp_prompts.select_meta_token("goldfish, Carassius auratus", tok) == "goldfish"
    assert gp_prompts.select_meta_token("electric ray, crampfish, numbfish, torpedo", tok) == "ray"
    assert class_text("001.Black_footed_Albatross", synonyms="all") == "Black footed Albatross"
    assert method.meta_tokens == CLASSES


def test_concept_tokens_get_official_ids(method):
    assert method.concept_tokens == ["<syn-0>", "<syn-1>", "<syn-2>"]
    assert method.concept_token_ids == [49408, 49409, 49410]
    ids = method.tokenizer.encode("a photo of a <syn-1>", add_special_tokens=True)
    assert ids[5] == 49409  # the class token sits at index 5, where the attention is read
    base = method.concepts.base.weight
    star = method.tokenizer.encode("star", add_special_tokens=False)[0]
    assert torch.equal(method.concepts.rows[0].detach(), base[star])  # initialised from the meta token


def test_combined_embedding_arithmetic(method):
    f_d = method.class_embedding(1, "discriminative")
    f_r = method.class_embedding(1, "representative")
    f_c = method.class_embedding(1, "combined")
    assert torch.allclose(f_c, 0.6 * f_r + 0.4 * f_d, atol=1e-6)
    assert torch.allclose(f_d, method.encode_texts([t.format("heart") for t in method.config["prompts"]["templates"]]).mean(0), atol=1e-6)
    assert torch.allclose(gp_prompts.combine_embeddings(torch.ones(2), torch.zeros(2), 0.25, "combined"), torch.full((2,), 0.25))
    with pytest.raises(ValueError):
        gp_prompts.combine_embeddings(f_r, f_d, 0.5, "both")


# ----------------------------------------------------------------------------------------------- aggregation
def test_aggregation_matches_hand_computation():
    """Two groups; group A = two 2x2 layers, group B = one 2x2 layer; T = 2; out_size 2 (no resize effect)."""
    la, lb, lc = (AttentionLayer(n, "up", 0, 0, True) for n in ("a", "b", "c"))
    a = torch.tensor([[[[1., 2.], [3., 4.]], [[3., 2.], [1., 0.]]]])  # Q=1, T=2: mean over T = 2 everywhere
    b = torch.tensor([[[[0., 0.], [0., 8.]], [[0., 0.], [0., 0.]]]])  # mean over T: [[0,0],[0,4]]
    c = torch.tensor([[[[4., 0.], [0., 0.]], [[0., 0.], [0., 0.]]]])  # mean over T: [[2,0],[0,0]]
    got = gp_inference.aggregate_maps({"a": a, "b": b, "c": c}, [[la, lb], [lc]], out_size=2)
    group_a = (torch.full((2, 2), 2.) + torch.tensor([[0., 0.], [0., 4.]])) / 2  # [[1,1],[1,3]]
    group_c = torch.tensor([[2., 0.], [0., 0.]])
    expect = (group_a + group_c) / 2  # [[1.5, .5], [.5, 1.5]]
    assert torch.allclose(got[0], expect / expect.max())
    # resizing is bicubic, as cv2.INTER_CUBIC in the official code; max-normalised afterwards
    big = gp_inference.aggregate_maps({"a": a, "b": b, "c": c}, [[la, lb], [lc]], out_size=8)
    assert big.shape == (1, 8, 8) and torch.isclose(big.max(), torch.tensor(1.))


def test_group_layers_and_errors(method):
    groups = method.groups
    # micro U-Net (two levels, 1 layer per block): level 1 = down_blocks.1 + mid + up_blocks.0 (2 layers)
    assert [len(g) for g in groups] == [4, 2, 1]
    assert {l.level for l in groups[0]} == {1} and {l.place for l in groups[1]} == {"up"}
    with pytest.raises(ValueError, match="matches no cross-attention layer"):
        gp_inference.group_layers(method.cross_layers, [{"places": ["down"], "levels": [5]}])
    with pytest.raises(ValueError, match="unknown key"):
        gp_inference.group_layers(method.cross_layers, [{"places": ["down"], "level": [0]}])


# ----------------------------------------------------------------------------------------------- inference
def test_localize_shapes_and_batching_invariance(method):
    imgs = _images(3)
    out = method.localize(imgs, classes=[0, 1, 2])
    assert out.maps.shape == (3, 1, 8, 8) and out.logits is None
    assert torch.allclose(out.maps.amax(dim=(-2, -1)), torch.ones(3, 1))
    # same images, U-Net batch of 1 (one (query, timestep) pair per forward): same maps
    m2 = make_method(micro_config(unet_batch=1))
    m2.load_state_dict(method.state_dict())
    m2.unet.load_state_dict(method.unet.state_dict())
    again = m2.localize(imgs, classes=[0, 1, 2])
    assert torch.allclose(out.maps, again.maps, atol=1e-5)
    several = method.localize(imgs[:2], classes=[[0, 1, 2], [2, 1, 0]])
    assert several.maps.shape == (2, 3, 8, 8) and several.classes == [[0, 1, 2], [2, 1, 0]]
    assert torch.allclose(several.maps[0, 0], out.maps[0, 0], atol=1e-5)  # image 0 of another batch
    assert torch.allclose(several.maps[1, 1], out.maps[1, 0], atol=1e-5)
    with pytest.raises(Exception, match="classifier"):
        method.localize(imgs)  # no classes and no classifier


def test_phrase_capability(method):
    assert Capability.PHRASE in method.capabilities
    out = method.localize(_images(1), texts=[["a red star", "heart"]])
    assert out.maps.shape == (1, 2, 8, 8)
    _, pos = method.phrase_embedding("a red star")
    assert pos == [5, 6, 7]


def test_ablation_switches():
    cfg = micro_config(timesteps=[10], early_exit=False)
    cfg["prompts"]["embedding"] = "discriminative"
    cfg["inference"]["groups"] = [{"places": ["up"], "levels": [0]}]
    m = make_method(cfg)
    assert m.localize(_images(1), classes=[0]).maps.shape == (1, 1, 8, 8)
    with pytest.raises(ValueError, match="timesteps"):
        make_method(micro_config(timesteps=[1000])).localize(_images(1), classes=[0])


def test_predictions_json_classifier(tmp_path, method):
    preds = {"cls0/img0": {"pred_scores": [0.1, 0.7, 0.2]}, "x/img1.jpg": {"pred_scores": [0.9, 0.05, 0.05]}}
    path = tmp_path / "preds.json"
    path.write_text(json.dumps(preds))
    clf = gp_classifier.PredictionsClassifier(path)
    logits = clf(None, ["cls0/img0.png", "img1"])
    assert logits.argmax(1).tolist() == [1, 0]
    method.classifier = clf
    try:
        out = method.localize_predicted(_images(2), k=2, image_ids=["cls0/img0.jpg", "x/img1"])
        assert out.classes == [[1, 2], [0, 1]] and out.maps.shape == (2, 2, 8, 8)
        assert method.localize(_images(2), classes=[0, 1], meta=[ImageMeta("cls0/img0"), ImageMeta("img1")]).logits.shape == (2, 3)
        own = method.localize(_images(2), meta=[ImageMeta("cls0/img0"), ImageMeta("img1")])  # the classifier's top-1 class
        assert own.classes == [[1], [0]] and torch.allclose(own.maps[:, 0], out.maps[:, 0], atol=1e-5)
    finally:
        method.classifier = None


def test_classifier_preprocessing_comes_from_the_config_else_the_model():
    """classifier.input_size/mean/std: the config's, each null one from the model's pretrained_cfg; a model
    without one is an error naming the key (no hidden ImageNet default)."""
    model = torch.nn.Linear(1, 1)
    model.pretrained_cfg = {"input_size": (3, 64, 64), "mean": [0.5] * 3, "std": [0.25] * 3}
    unset = {"input_size": None, "mean": None, "std": None}
    assert gp_classifier.preprocessing(unset, model) == (64, (0.5,) * 3, (0.25,) * 3)
    assert gp_classifier.preprocessing({**unset, "input_size": 600, "std": [1, 1, 1]}, model) == \
        (600, (0.5,) * 3, (1, 1, 1))
    with pytest.raises(ValueError, match="classifier.mean"):
        gp_classifier.preprocessing({**unset, "input_size": 32}, torch.nn.Linear(1, 1))


def test_config_paths_as_given_else_under_the_weights_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WSOLBENCH_WEIGHTS", str(tmp_path / "weights"))
    (tmp_path / "weights" / "genpromp").mkdir(parents=True)
    (tmp_path / "weights" / "genpromp" / "preds.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert local_path("genpromp/preds.json") == tmp_path / "weights" / "genpromp" / "preds.json"
    (tmp_path / "genpromp").mkdir()
    (tmp_path / "genpromp" / "preds.json").write_text("{}")
    assert local_path("genpromp/preds.json") == Path("genpromp/preds.json")  # the CWD's first
    assert local_path("absent.json") == Path("absent.json")  # its error names the path given


# ----------------------------------------------------------------------------------------------- training
def _snapshot(m):
    return {**{f"te.{k}": v.clone() for k, v in m.text_encoder.state_dict().items() if "rows" not in k},
            **{f"unet.{k}": v.clone() for k, v in m.unet.state_dict().items()},
            **{f"vae.{k}": v.clone() for k, v in m.vae.state_dict().items()}}


def test_stage1_changes_only_trained_concept_rows(train_set, tmp_path):
    cfg = micro_config()
    cfg["train"]["stage2"]["enabled"] = False
    m = make_method(cfg)
    before = _snapshot(m)
    rows0 = m.concepts.table().detach().clone()
    report = m.fit(train_set, out_dir=tmp_path, progress=False)
    assert report["stage1"]["classes_trained"] == 2
    after = _snapshot(m)
    assert all(torch.equal(before[k], after[k]) for k in before)  # text encoder, U-Net, VAE untouched
    rows1 = m.concepts.table().detach()
    assert not torch.allclose(rows0[0], rows1[0]) and not torch.allclose(rows0[1], rows1[1])
    assert torch.equal(rows0[2], rows1[2])  # no images of class 2: its row stays at the meta init
    files = sorted(p.name for p in (tmp_path / "tokens").glob("*.bin"))
    assert files == ["49408.bin", "49409.bin"]
    # resume: nothing left to train, rows reloaded from the token files
    m2 = make_method(cfg)
    rep2 = m2.fit(train_set, out_dir=tmp_path, resume=True, progress=False)
    assert rep2["stage1"] == {**rep2["stage1"], "classes_trained": 0, "classes_resumed": 2}
    assert torch.allclose(m2.concepts.table()[:2], rows1[:2])


def test_official_token_files_round_trip(tmp_path, method):
    with torch.no_grad():
        method.concepts.rows[1].add_(0.5)
    try:
        method.save_official_tokens(tmp_path / "tokens")
        obj = torch.load(tmp_path / "tokens" / "49409.bin", weights_only=True)
        assert list(obj) == ["<syn-1>"] and obj["<syn-1>"].shape == (method.concepts.rows[1].shape[0],)
        cfg = micro_config()
        cfg["model"]["token_path"] = str(tmp_path / "tokens")
        fresh = make_method(cfg)  # the official-layout folder loads through model.token_path
        assert torch.allclose(fresh.concepts.table(), method.concepts.table())
    finally:
        with torch.no_grad():
            method.concepts.rows[1].sub_(0.5)


def test_stage2_and_checkpoint_round_trip(train_set, tmp_path):
    cfg = micro_config()
    cfg["train"]["stage1"]["max_classes"] = 1
    cfg["model"]["token_path"] = None
    m = make_method(cfg)
    before = {k: v.clone() for k, v in m.unet.state_dict().items()}
    report = m.fit(train_set, out_dir=tmp_path / "train", progress=False)
    assert report["stage2"]["steps"] == 2 and m.unet_finetuned
    assert any(not torch.equal(before[k], v) for k, v in m.unet.state_dict().items())
    assert (tmp_path / "train" / "unet" / "config.json").exists()
    assert (tmp_path / "train" / gp_train.STAGE2_STATE).exists()
    m.save(tmp_path / "ckpt")
    for f in ("config.yaml", "model.safetensors", "tokens/49408.bin", "unet/config.json"):
        assert (tmp_path / "ckpt" / f).exists(), f
    m2 = gp.GenPromp.load(tmp_path / "ckpt")  # rebuilt from the saved config (micro zoo) + rows + unet/
    assert m2.unet_finetuned and torch.equal(m2.concepts.table(), m.concepts.table())
    imgs = _images(2)
    assert torch.allclose(m.localize(imgs, classes=[0, 1]).maps, m2.localize(imgs, classes=[0, 1]).maps, atol=1e-5)
    # the same checkpoint under another config (an ablation switch): the pretrained U-Net, same concept rows
    plain_cfg = micro_config()
    plain_cfg["inference"]["finetuned"] = False
    plain = gp.GenPromp.load(tmp_path / "ckpt", config=plain_cfg)
    assert not plain.unet_finetuned and torch.equal(plain.concepts.table(), m.concepts.table())
    assert not torch.allclose(plain.localize(imgs, classes=[0, 1]).maps, m2.localize(imgs, classes=[0, 1]).maps)
    # resume at the end of stage 2: nothing more to do, same U-Net
    m3 = make_method(cfg)
    rep = m3.fit(train_set, out_dir=tmp_path / "train", resume=True, progress=False)
    assert rep["stage1"]["classes_trained"] == 0 and rep["stage1"]["classes_resumed"] == 1
    for k, v in m.unet.state_dict().items():
        assert torch.allclose(v, m3.unet.state_dict()[k])


# ----------------------------------------------------------------------------------------------- paper profile
def test_paper_config_is_the_official_recipe():
    cfg = load_method_config("genpromp", profile="paper", dataset_key="cub")
    assert cfg["inference"]["timesteps"] == [0, 99] and cfg["prompts"]["combine_ratio"] == 0.6
    assert cfg["prompts"]["meta_token"] == "bird" and cfg["prompts"]["token_index"] == 5
    assert len(cfg["prompts"]["templates"]) == 7 and cfg["model"]["image_size"] == 512
    s1 = cfg["train"]["stage1"]
    assert (s1["epochs"], s1["batch_size"] * s1["grad_accum"], s1["lr"]) == (2, 4, 5e-5)
    ilsvrc = load_method_config("genpromp", profile="paper", dataset_key="ilsvrc")
    assert ilsvrc["prompts"]["concept_token"] == "<imagenet-{}>" and ilsvrc["prompts"]["meta_token"] is None


def test_paper_profile_without_weights_says_what_is_missing(isolated_env):
    cfg = load_method_config("genpromp", profile="paper", dataset_key="cub")
    with pytest.raises(Exception) as err:
        gp.GenPromp.from_config(cfg, class_names=["a", "b"])
    assert "stable-diffusion-v1-4" in str(err.value)


def test_paper_groups_on_the_full_size_sd14_unet():
    """The SD v1.4 U-Net (built on the meta device: no memory, no weights) under the paper's groups: the 8x8
    maps are the mid block's, 16x16 up = up_blocks.1 (3 layers), 16x16 down = down_blocks.2 (2 layers)."""
    import sys

    from diffusers import UNet2DConditionModel

    from wsolbench.maps.cross_attention import level_size, unet_attention_layers

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    try:
        from genpromp_latency import SD14_UNET
    finally:
        sys.path.pop(0)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD14_UNET)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # SD v1.4's U-Net
    cfg = load_method_config("genpromp", profile="paper", dataset_key="cub")
    groups = gp_inference.group_layers(unet_attention_layers(unet), cfg["inference"]["groups"])
    assert [[l.name.split(".attentions")[0] for l in g] for g in groups] == [
        ["mid_block"], ["up_blocks.1"] * 3, ["down_blocks.2"] * 2]
    assert [level_size((64, 64), g[0].level) for g in groups] == [(8, 8), (16, 16), (16, 16)]


def test_stage2_resume_after_interruption_matches_uninterrupted(train_set, tmp_path, monkeypatch):
    cfg = micro_config()
    cfg["train"]["stage1"]["max_classes"] = 1
    full = make_method(cfg)
    full.fit(train_set, out_dir=tmp_path / "full", progress=False)

    original = gp.GenPromp._save_stage2

    def save_then_die(self, out_dir, opt, step, rng):
        original(self, out_dir, opt, step, rng)
        raise KeyboardInterrupt  # killed right after the checkpoint of step 1

    monkeypatch.setattr(gp.GenPromp, "_save_stage2", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        make_method(cfg).fit(train_set, out_dir=tmp_path / "cut", progress=False)
    monkeypatch.setattr(gp.GenPromp, "_save_stage2", original)
    resumed = make_method(cfg)
    resumed.fit(train_set, out_dir=tmp_path / "cut", resume=True, progress=False)
    assert torch.equal(resumed.concepts.table(), full.concepts.table())
    for k, v in full.unet.state_dict().items():
        assert torch.allclose(v, resumed.unet.state_dict()[k], atol=1e-6), k


def test_registered_and_runs_through_the_harness(isolated_env, monkeypatch):
    """`wsolbench run --method genpromp --dataset synthetic-cub --profile tiny` on micro components: the
    micro zoo classifier (built into the test's cache) gives Top-1/Top-5 Loc beside GT-known Loc."""
    from wsolbench.harness import RunSpec, run

    monkeypatch.setenv("WSOLBENCH_ZOO_AUTOBUILD", "1")  # the micro classifier is built into the test's cache
    from wsolbench.registry import get_method_class

    assert get_method_class("genpromp") is gp.GenPromp
    groups = json.dumps(MICRO_GROUPS).replace('"', "")
    overrides = ("model.zoo_scale=micro", "model.image_size=32", f"inference.groups={groups}",
                 "inference.map_size=8", "train.augment.resize=32", "train.augment.crop=32",
                 "train.stage1.epochs=1", "train.stage1.batch_size=2", "train.stage1.parallel_classes=2",
                 "train.stage2.steps=2", "train.stage2.batch_size=2", "train.stage2.save_steps=1",
                 "classifier.kind=zoo", "classifier.zoo_scale=micro", "harness.batch_size=4")
    res = run(RunSpec(method="genpromp", dataset="synthetic-cub", profile="tiny", limit=4,
                      out=isolated_env / "runs", progress=False, overrides=overrides))
    record = json.loads((res.run_dir / "metrics.json").read_text())
    assert record["protocol"]["name"] == "genpromp" and record["protocol"]["tau"] == 0.23  # inference.cam_thr
    for key in ("gt_known_loc", "top1_loc", "top5_loc", "top1_cls", "top5_cls"):
        assert key in record["results"]["default"], key
