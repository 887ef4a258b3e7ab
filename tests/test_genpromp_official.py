"""GenPromp's settings that the official code (callsys/GenPromp @ c480e0a) fixes and its paper does not say:
meta tokens from the full ILSVRC synonym string, lr scaling, the kept stage-2 step, stage-1 weight decay over
the whole token-embedding matrix, the preprocessing, and predictions-JSON errors."""
from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from wsolbench.config import load_method_config  # noqa: E402


def _sibling(name: str):
    """A test module beside this one (its micro-component helpers), whatever pytest's import mode."""
    spec = importlib.util.spec_from_file_location(f"_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gp = importlib.import_module("wsolbench.methods.genpromp.method")
gp_prompts = importlib.import_module("wsolbench.methods.genpromp.prompts")
gp_inference = importlib.import_module("wsolbench.methods.genpromp.inference")
gp_classifier = importlib.import_module("wsolbench.methods.genpromp.classifier")
gp_train = importlib.import_module("wsolbench.methods.genpromp.train")
micro = _sibling("test_genpromp")
ListDataset, micro_components, micro_config, make_method = (micro.ListDataset, micro.micro_components,
                                                            micro.micro_config, micro.make_method)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Real lines of ILSVRC's LOC_synset_mapping.txt and the official rule's choice (each synonym's last word,
# the first that is one CLIP token; else the last BPE piece of the first synonym's), with the choice the
# first synonym alone gives
ILSVRC_LINES = [
    ("n01440764 tench, Tinca tinca", "ch", "ch"),  # no synonym is one token: the fallback
    ("n01494475 hammerhead, hammerhead shark", "shark", "head"),
    ("n01496331 electric ray, crampfish, numbfish, torpedo", "ray", "ray"),
    ("n01632777 axolotl, mud puppy, Ambystoma mexicanum", "puppy", "l"),
    ("n02088238 basset, basset hound", "hound", "set"),
    ("n02110341 dalmatian, coach dog, carriage dog", "dog", "an"),
    ("n03770439 miniskirt, mini", "mini", "t"),
    ("n04592741 wing", "wing", "wing"),
]


@pytest.fixture(scope="module")
def clip_tokenizer():
    from wsolbench.zoo.tokenizers import make_clip_tokenizer

    return make_clip_tokenizer(77)


@pytest.mark.parametrize("line, official, first_only", ILSVRC_LINES)
def test_meta_token_rule_on_real_ilsvrc_names(clip_tokenizer, line, official, first_only):
    names = line.split(None, 1)[1]
    assert gp_prompts.select_meta_token(names, clip_tokenizer) == official
    assert gp_prompts.select_meta_token(names.split(",")[0], clip_tokenizer) == first_only


def test_66_of_the_1000_classes_need_the_full_synonym_string(clip_tokenizer):
    from wsolbench.datasets.ilsvrc import timm_imagenet_mapping

    table = timm_imagenet_mapping()
    if table is None:
        pytest.skip("timm's ImageNet synset table is not installed")
    wnids, synonyms = table
    assert len(wnids) == 1000
    differ = [w for w, s in zip(wnids, synonyms)
              if gp_prompts.select_meta_token(s[0], clip_tokenizer) != gp_prompts.select_meta_token(", ".join(s), clip_tokenizer)]
    assert len(differ) == 66 and "n01494475" in differ


def write_ilsvrc(root: Path, n_train: int = 2) -> Path:
    """An ILSVRC tree with three real synsets: the synset mapping, train/<wnid>/ images, val images + XMLs."""
    from PIL import Image

    lines = [ILSVRC_LINES[i][0] for i in (1, 3, 4)]
    root.mkdir(parents=True, exist_ok=True)
    (root / "LOC_synset_mapping.txt").write_text("\n".join(lines) + "\n")
    rng = np.random.default_rng(0)
    (root / "val").mkdir(exist_ok=True)
    for k, line in enumerate(lines):
        wnid = line.split()[0]
        (root / "train" / wnid).mkdir(parents=True, exist_ok=True)
        for j in range(n_train):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / "train" / wnid / f"{wnid}_{j}.JPEG", "PNG")
        name = f"ILSVRC2012_val_{k + 1:08d}"
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / "val" / f"{name}.JPEG", "PNG")
        (root / "val" / f"{name}.xml").write_text(
            f"<annotation><filename>{name}</filename><size><width>48</width><height>40</height></size>"
            f"<object><name>{wnid}</name><bndbox><xmin>5</xmin><ymin>6</ymin><xmax>30</xmax><ymax>33</ymax>"
            f"</bndbox></object></annotation>")
    return root


def test_ilsvrc_dataset_synonyms_reach_the_meta_tokens(tmp_path):
    from wsolbench.registry import create_dataset

    ds = create_dataset("ilsvrc", root=write_ilsvrc(tmp_path / "ILSVRC"), split="test")
    assert ds.class_names == ["hammerhead", "axolotl", "basset"]
    cfg = micro_config()
    cfg["prompts"]["meta_token"] = None
    m = gp.GenPromp.from_config(cfg, class_names=ds.class_names, components=micro_components(),
                                class_synonyms=ds.class_synonyms)
    assert m.meta_tokens == ["shark", "puppy", "hound"]
    base = m.concepts.base.weight
    assert torch.equal(m.concepts.rows[0].detach(), base[m.tokenizer.encode("shark", add_special_tokens=False)[0]])
    names_only = gp.GenPromp.from_config(cfg, class_names=ds.class_names, components=micro_components())
    assert names_only.meta_tokens == ["head", "l", "set"]  # what the first synonym alone gives
    with pytest.raises(ValueError, match="class_synonyms"):
        gp.GenPromp.from_config(cfg, class_names=ds.class_names, components=micro_components(),
                                class_synonyms=[("a",)])


def test_harness_passes_the_synonyms_and_the_checkpoint_keeps_them(tmp_path, isolated_env):
    """`wsolbench run --method genpromp --dataset ilsvrc` (micro, one stage-1 class): the trained method,
    reloaded from the run's checkpoint, still conditions f_d on "shark", not on "head"."""
    from wsolbench.harness import RunSpec, run

    root = write_ilsvrc(tmp_path / "ILSVRC")
    groups = json.dumps([{"places": ["down", "mid", "up"], "levels": [1]}, {"places": ["up"], "levels": [0]},
                         {"places": ["down"], "levels": [0]}]).replace('"', "")
    overrides = ("model.zoo_scale=micro", "model.image_size=32", f"inference.groups={groups}", "inference.map_size=8",
                 "prompts.meta_token=null", "train.augment.resize=32", "train.augment.crop=32",
                 "train.stage1.epochs=1", "train.stage1.batch_size=2", "train.stage1.max_classes=1",
                 "train.stage2.enabled=false", "classifier.kind=none")
    res = run(RunSpec(method="genpromp", dataset="ilsvrc", data_root=root, profile="tiny", limit=2,
                      out=isolated_env / "runs", progress=False, overrides=overrides))
    m = gp.GenPromp.load(res.run_dir / "checkpoint")
    assert m.meta_tokens == ["shark", "puppy", "hound"]
    assert json.loads((res.run_dir / "checkpoint" / gp.SYNONYMS_FILE).read_text())[0] == ["hammerhead", "hammerhead shark"]


# --------------------------------------------------------------------------------------------- learning rates
def test_stage2_lr_is_scaled_by_batch_accumulation_and_processes():
    ilsvrc = load_method_config("genpromp", profile="paper", dataset_key="ilsvrc")["train"]
    assert gp_train.scaled_lr(ilsvrc["stage2"]) == pytest.approx(5e-8 * 2 * 32)  # one process: 3.2e-6
    assert gp_train.scaled_lr({**ilsvrc["stage2"], "processes": 8}) == pytest.approx(5e-8 * 2 * 32 * 8)
    assert gp_train.scaled_lr(ilsvrc["stage1"]) == pytest.approx(5e-5 * 2 * 2)
    cub = load_method_config("genpromp", profile="paper", dataset_key="cub")["train"]
    assert gp_train.scaled_lr(cub["stage2"]) == 5e-6  # configs/cub_stage2.yml: scale_lr False
    assert gp_train.scaled_lr(cub["stage1"]) == pytest.approx(5e-5 * 4 * 1)
    assert (cub["stage2"]["checkpoint_step"], ilsvrc["stage2"]["checkpoint_step"]) == (239, 599)


def test_stage2_trains_to_the_kept_step_at_the_scaled_lr(tmp_path):
    imgs = _train_set(tmp_path, [0, 0, 1, 1])
    cfg = micro_config()
    cfg["train"]["stage1"]["max_classes"] = 1
    cfg["train"]["stage2"].update({"steps": 3, "checkpoint_step": 2, "scale_lr": True, "grad_accum": 2,
                                   "processes": 3, "lr": 1e-5})
    report = make_method(cfg).fit(imgs, out_dir=tmp_path / "train", progress=False)["stage2"]
    assert report["steps"] == 2 and report["max_steps"] == 3
    assert report["lr"] == pytest.approx(1e-5 * 2 * 2 * 3)
    assert torch.load(tmp_path / "train" / gp_train.STAGE2_STATE, weights_only=True)["step"] == 2
    cfg["train"]["stage2"]["checkpoint_step"] = 4
    with pytest.raises(ValueError, match="checkpoint_step"):
        make_method(cfg).fit(imgs, progress=False)


# --------------------------------------------------------------------------------------------- stage-1 decay
def _train_set(root: Path, labels) -> ListDataset:
    from PIL import Image

    from wsolbench.datasets.base import Sample

    rng = np.random.default_rng(0)
    out = ListDataset()
    for i, c in enumerate(labels):
        p = root / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(p)
        out.append(Sample(image_id=f"cls{c}/img{i}.png", image_path=p, size=(36, 40), labels=(c,)))
    return out


def official_stage1(m, train_set) -> torch.Tensor:
    """The official train_token, written plainly: ONE token-embedding matrix (vocabulary + concept rows), for
    each class in turn a fresh AdamW over the whole matrix with every gradient row but the class's zeroed;
    the class's row is read when its training ends. Same data, noise and template draws as wsolbench's."""
    from torch import nn

    from wsolbench.training import seed_everything

    st, seed = m.config["train"]["stage1"], int(m.config["train"]["seed"])
    lr = gp_train.scaled_lr(st)
    table = nn.Embedding.from_pretrained(m.concepts.weight.detach().clone(), freeze=False)
    m.text_encoder.set_input_embeddings(table)
    by_class = [[i for i, s in enumerate(train_set) if s.label == c] for c in range(len(m.class_names))]
    transform = m._train_transform()
    seed_everything(seed)
    learned = []
    for c in range(len(m.class_names)):
        torch.manual_seed(seed * 7919 + c)
        opt = torch.optim.AdamW(table.parameters(), lr=lr, betas=tuple(st["betas"]), weight_decay=st["weight_decay"],
                                eps=st["eps"])
        for mb, step in m._stage1_plan(c, by_class[c], st):
            zt, noise, t = m._noisy(m._load_batch(train_set, mb, transform))
            choice = torch.randint(len(m.templates), (len(mb),)).tolist()
            ids = m._tokenize([m.templates[k].format(m.concept_tokens[c]) for k in choice])
            pred = m.unet(zt, t, encoder_hidden_states=m.text_encoder(ids)[0]).sample
            (torch.nn.functional.mse_loss(pred, noise, reduction="none").mean([1, 2, 3]).mean()
             / int(st["grad_accum"])).backward()
            if step:
                keep = torch.ones(len(table.weight), dtype=torch.bool)
                keep[m.token_offset + c] = False
                table.weight.grad[keep] = 0
                opt.step()
                opt.zero_grad()
        learned.append(table.weight[m.token_offset + c].detach().clone())
    return torch.stack(learned)


def test_stage1_decays_the_whole_token_matrix_as_the_official_code(tmp_path):
    imgs = _train_set(tmp_path, [0, 0, 0, 0, 1, 1, 2, 2])
    cfg = micro_config()
    cfg["train"]["stage2"]["enabled"] = False
    cfg["train"]["stage1"].update({"epochs": 2, "batch_size": 2, "grad_accum": 1, "parallel_classes": 1,
                                   "lr": 1e-3, "weight_decay": 10.0})  # keep = 1 - lr*wd = 0.99 per step
    assert cfg["train"]["stage1"]["weight_decay_scope"] == "vocabulary"  # the default
    ours = make_method(cfg)
    ours.fit(imgs, progress=False)
    reference = official_stage1(make_method(cfg), imgs)
    assert torch.allclose(ours.concepts.table(), reference, atol=1e-6, rtol=1e-5)
    # the alternative decays only the class's own row (the vocabulary stays): class 2, trained after 6 steps
    # of the others, ends elsewhere
    cfg["train"]["stage1"]["weight_decay_scope"] = "concept"
    own = make_method(cfg)
    own.fit(imgs, progress=False)
    assert not torch.allclose(own.concepts.table()[2], reference[2], atol=1e-3)


# --------------------------------------------------------------------------------------------- preprocessing
def test_pixels_are_pil_bicubic_on_uint8():
    from PIL import Image

    rng = np.random.default_rng(3)
    img = rng.integers(0, 255, (30, 47, 3), dtype=np.uint8)
    expect = np.asarray(Image.fromarray(img).resize((64, 64), Image.BICUBIC)).astype(np.float64) / 127.5 - 1
    for given in (img, Image.fromarray(img), torch.from_numpy(img).permute(2, 0, 1), img / 255.0):
        got = gp_inference.official_pixels(given, 64)
        assert got.dtype == torch.float32 and got.shape == (3, 64, 64)
        assert np.array_equal(got.permute(1, 2, 0).numpy(), expect.astype(np.float32))


# --------------------------------------------------------------------------------------------- predictions
def test_predictions_json_refuses_to_drop_top1(tmp_path):
    from wsolbench.localizer import ImageMeta, InputError
    path = tmp_path / "preds.json"
    path.write_text(json.dumps({"001.A/img0": {"pred_scores": [0.1, 0.7, 0.2]}}))
    m = make_method()
    m.classifier = gp_classifier.PredictionsClassifier(path)
    imgs = [np.zeros((16, 16, 3), np.uint8)]
    with pytest.raises(InputError, match="image id"):
        m.localize(imgs, classes=[0])  # no meta: Top-1/Top-5 would be silently missing
    with pytest.raises(InputError, match="no prediction for image 'other.jpg'"):
        m.localize(imgs, classes=[0], meta=[ImageMeta("other.jpg")])
    assert m.localize(imgs, classes=[0], meta=[ImageMeta("images/001.A/img0.jpg")]).logits.argmax().item() == 1
