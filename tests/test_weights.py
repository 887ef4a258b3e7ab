"""wsolbench.weights: catalogue, offline resolution in every kind of location, errors, safe loading."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from wsolbench import weights as W  # noqa: E402


@pytest.fixture
def env(isolated_env, monkeypatch):
    """Empty weights dir, HF cache, torch hub and XDG caches under tmp; offline hub."""
    root = isolated_env
    monkeypatch.setenv("HF_HUB_CACHE", str(root / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(root / "torch"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(root / "xdg"))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return root


def _touch(path: Path, text: str = "{}") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _fake_sd(folder: Path) -> Path:
    spec = W.CATALOGUE["sd-v1-4"]
    for entry in spec.files:
        _touch(folder / entry.split("|")[0])
    return folder


def _fake_hf_cache(env: Path, repo: str, files: dict[str, bytes | str], rev: str = "0" * 40) -> Path:
    base = env / "hf" / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / rev
    for rel, content in files.items():
        p = snap / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        (p.write_bytes if isinstance(content, bytes) else p.write_text)(content)
    _touch(base / "refs" / "main", rev)
    return snap


def test_catalogue_covers_every_paper_model():
    sources = {s.source for s in W.catalogue()}
    for needed in ("CompVis/stable-diffusion-v1-4", "ViT-B-16/openai", "ViT-B-32/openai", "ViT-L-14/openai",
                   "eva02_large_patch14_448.mim_m38m_ft_in22k_in1k", "tf_efficientnet_b7.ns_jft_in1k",
                   "vgg16/IMAGENET1K_V1", "resnet50/IMAGENET1K_V1", "inception_v3/IMAGENET1K_V1",
                   "Salesforce/blip-image-captioning-base"):
        assert needed in sources
    for spec in W.catalogue():  # every model has a user: a method class names it in ``pretrained``
        assert spec.licence and spec.files and W.users(spec.name)
    assert {s.name for s in W.weights_for_method("genpromp")} == {"sd-v1-4", "efficientnet-b7"}
    assert "clip-vit-b32-openai" in {s.name for s in W.weights_for_method("WWbL")}
    assert W.users("clip-vit-b16-openai") == ["mmcst", "tedloc"] and W.users("vgg16") == ["cam", "wwbl"]


def test_a_method_declares_its_weights_and_listing_them_imports_no_method():
    """The class's ``pretrained`` (read from its source) is what ``weights_for_method`` and ``users`` report; the
    package's own models join the catalogue; none of it imports a method module or torch."""
    import subprocess
    import sys

    code = ("import sys; from wsolbench import weights as W; "
            "print(sorted(W.users('sd-v1-4')), [s.name for s in W.weights_for_method('tedloc')], "
            "sorted(m for m in sys.modules if m.endswith('.method')), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ("['genpromp'] ['eva01-large', 'eva02-large', 'clip-vit-b16-openai', 'clip-vit-l14-openai'] "
                   "[] False")
    from wsolbench.registry import get_method_class

    for m in ("cam", "tedloc", "mmcst", "wwbl", "genpromp"):  # the source reading agrees with the class
        assert [s.name for s in W.weights_for_method(m)] == list(get_method_class(m).pretrained)
    with pytest.raises(KeyError, match="did you mean"):
        W.resolve("sd-v1-5")


def test_missing_error_names_model_files_paths_and_command(env):
    with pytest.raises(W.MissingWeightsError) as info:
        W.resolve("sd-v1-4")
    msg = str(info.value)
    assert "'sd-v1-4'" in msg and "CompVis/stable-diffusion-v1-4" in msg
    assert "unet/diffusion_pytorch_model.safetensors" in msg  # files expected
    assert str(env / "weights" / "sd-v1-4") in msg  # WSOLBENCH_WEIGHTS searched
    assert "models--CompVis--stable-diffusion-v1-4" in msg  # HF cache searched
    assert "wsolbench weights fetch sd-v1-4" in msg and "hf download CompVis/stable-diffusion-v1-4" in msg
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(W.MissingWeightsError, match="torch hub cache"):
        W.resolve("vgg16")


def test_explicit_path_wins_and_is_checked(env, tmp_path):
    good = _fake_sd(tmp_path / "my-sd")
    _fake_sd(env / "weights" / "sd-v1-4")
    assert W.resolve("sd-v1-4", path=good) == good
    bad = tmp_path / "empty"
    bad.mkdir()
    with pytest.raises(W.MissingWeightsError, match="explicit path lacks the expected files") as info:
        W.resolve("sd-v1-4", path=bad)
    assert str(env / "weights") not in str(info.value)  # an explicit path is the only place searched
    f = _touch(tmp_path / "vgg.pth")
    assert W.resolve("vgg16", path=f) == f


def test_a_relative_explicit_path_is_read_from_the_current_folder_then_the_weights_dir(env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    in_dir = _touch(env / "weights" / "mine" / "vgg.pth")
    assert W.resolve("vgg16", path="mine/vgg.pth") == in_dir
    here = _touch(tmp_path / "mine" / "vgg.pth")
    assert W.resolve("vgg16", path="mine/vgg.pth") == Path("mine/vgg.pth") and here.is_file()


def test_weights_dir_by_name_by_repo_and_flat_file(env):
    assert W.find("sd-v1-4")[0] is None
    repo_named = _fake_sd(env / "weights" / "stable-diffusion-v1-4")
    assert W.resolve("sd-v1-4") == repo_named
    by_name = _fake_sd(env / "weights" / "sd-v1-4")
    assert W.resolve("sd-v1-4") == by_name  # <dir>/<name> comes first
    flat = _touch(env / "weights" / "vgg16-397923af.pth")
    assert W.resolve("vgg16") == flat
    timm_dir = _touch(env / "weights" / "efficientnet-b7" / "model.safetensors").parent
    assert W.resolve("efficientnet-b7") == timm_dir / "model.safetensors"


def test_library_subfolders_and_shared_dirs(env):
    f = _touch(env / "weights" / "timm" / "deit_small_patch16_224.fb_in1k" / "model.safetensors")
    assert W.resolve("deit-s16") == f
    assert W.resolve_timm("deit_small_patch16_224.fb_in1k") == f
    g = _touch(env / "weights" / "torchvision" / "inception_v3_google-0cc3c7bd.pth")
    assert W.resolve("torchvision/inception_v3_google-0cc3c7bd.pth") == g
    # a generic file name in a shared folder belongs to nobody in particular
    _touch(env / "weights" / "model.safetensors")
    assert W.resolve_timm("vit-b16") is None


def test_names_outside_the_catalogue(env):
    snap = _fake_hf_cache(env, "timm/vit_small_patch16_224.augreg_in21k_ft_in1k", {"model.safetensors": b"x"})
    assert W.resolve("vit_small_patch16_224.augreg_in21k_ft_in1k") == snap / "model.safetensors"
    snap = _fake_hf_cache(env, "someone/some-model", {"config.json": "{}"})
    assert W.resolve("hf:someone/some-model") == snap
    assert W.resolve_diffusers(str(snap)) == snap  # a folder is taken as is
    with pytest.raises(W.MissingWeightsError, match="hf download someone/other"):
        W.resolve("hf:someone/other")
    err = W.MissingWeightsError("a method's own explanation")
    assert str(err) == "a method's own explanation" and isinstance(err, FileNotFoundError)


def test_hf_cache_offline(env):
    files = {e.split("|")[0]: "{}" for e in W.CATALOGUE["sd-v1-4"].files}
    snap = _fake_hf_cache(env, "CompVis/stable-diffusion-v1-4", files)
    assert W.resolve("sd-v1-4") == snap
    snap2 = _fake_hf_cache(env, "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k",
                           {"model.safetensors": b"x", "config.json": "{}"})
    assert W.resolve("vit-b16") == snap2 / "model.safetensors"
    snap3 = _fake_hf_cache(env, "timm/vit_base_patch32_clip_224.openai", {"open_clip_model.safetensors": b"x"})
    assert W.resolve("ViT-B-32") == snap3 / "open_clip_model.safetensors"  # alias of clip-vit-b32-openai


def test_torch_hub_and_open_clip_url_caches(env):
    f = _touch(env / "torch" / "hub" / "checkpoints" / "resnet50-0676ba61.pth")
    assert W.resolve("resnet50") == f
    g = _touch(env / "xdg" / "clip" / "ViT-B-16.pt")
    assert W.resolve("clip-vit-b16-openai") == g
    rows = {r["name"]: r for r in W.list_weights(include_zoo=False)}
    assert rows["resnet50"]["status"] == "found" and rows["resnet50"]["path"] == str(f)
    assert rows["sd-v1-4"]["status"] == "missing" and rows["sd-v1-4"]["path"] == ""
    assert set(rows["sd-v1-4"]) >= {"name", "source", "kind", "status", "path"}


def test_list_weights_includes_zoo_rows(env):
    rows = W.list_weights()
    zoo_rows = [r for r in rows if r["kind"] == "zoo"]
    assert {r["name"] for r in zoo_rows} >= {"zoo-tiny/clip", "zoo-micro/diffusion"}
    assert all(r["status"] in ("found", "missing") for r in zoo_rows)


def test_fetch_for_method_downloads_each_missing_model(env, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(W, "fetch", lambda name, target=None: calls.append(name) or Path("/x"))
    _touch(env / "weights" / "vgg16-397923af.pth")
    W.fetch_for_method("wwbl")
    assert "vgg16" not in calls  # already present
    assert set(calls) == {"clip-vit-b32-openai", "blip-caption-base", "resnet50", "inception-v3"}
    assert "already present" in capsys.readouterr().out
    with pytest.raises(KeyError):
        W.fetch_for_method("nosuchmethod")


def test_fetch_refuses_offline(env):
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE"):
        W.fetch("sd-v1-4")


# ------------------------------------------------------------------------------------------- loading
class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.E = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3))
        self.bn = torch.nn.BatchNorm2d(4)


def test_load_state_dict_formats(tmp_path):
    from safetensors.torch import save_file

    net = _Net()
    sd = net.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "a.safetensors"))
    torch.save({"model": sd, "epoch": 3}, tmp_path / "b.pth")  # MCTformer style
    torch.save(torch.nn.DataParallel(net), tmp_path / "c.pth")  # a whole pickled module
    for f in ("a.safetensors", "b.pth"):
        got = W.load_state_dict(tmp_path / f)
        assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
    got = W.load_state_dict(tmp_path / "c.pth")
    assert set(got) == {"module." + k for k in sd}
    assert all(torch.equal(got["module." + k], sd[k]) for k in sd)
    stripped = W.load_state_dict(tmp_path / "c.pth", strip_prefix="module.")
    assert stripped.keys() == sd.keys()
    with pytest.raises(ValueError, match="state_dict"):
        W.load_state_dict(tmp_path / "c.pth", allow_module_pickle=False)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['WSOL_EVIL_MARK']}",))


def test_load_state_dict_never_runs_pickled_code(tmp_path, monkeypatch):
    mark = tmp_path / "pwned"
    monkeypatch.setenv("WSOL_EVIL_MARK", str(mark))
    torch.save({"w": torch.ones(2), "evil": _Evil()}, tmp_path / "evil.pth")
    got = W.load_state_dict(tmp_path / "evil.pth")
    assert not mark.exists()
    assert torch.equal(got["w"], torch.ones(2))


def test_load_timm_and_open_clip_and_torchvision_offline(env, monkeypatch):
    """Real library loading paths with small stand-ins registered in the catalogue."""
    import timm
    from safetensors.torch import save_file

    from wsolbench import zoo

    vit = zoo.create_backbone("vit", "micro", num_classes=10)
    spec = W.WeightSpec("test-vit", "timm", "wsolbench_vit_micro", ("model.safetensors",), "MIT",
                        "test", hf_repo="test/wsolbench_vit_micro")
    monkeypatch.setitem(W.CATALOGUE, "test-vit", spec)
    snap = _fake_hf_cache(env, "test/wsolbench_vit_micro", {"config.json": "{}"})
    save_file(vit.state_dict(), str(snap / "model.safetensors"))
    got = W.load_timm("test-vit", num_classes=10)
    assert isinstance(got, timm.models.vision_transformer.VisionTransformer)
    assert all(torch.equal(a, b) for a, b in zip(vit.state_dict().values(), got.state_dict().values()))

    clip, _ = zoo.create_clip("micro")
    spec = W.WeightSpec("wsolbench-clip-micro/test", "open_clip", "wsolbench-clip-micro/test",
                        ("open_clip_model.safetensors",), "MIT", "test")
    monkeypatch.setitem(W.CATALOGUE, spec.name, spec)
    f = env / "weights" / spec.name / "open_clip_model.safetensors"
    f.parent.mkdir(parents=True)
    save_file(clip.state_dict(), str(f))
    model, tok = W.load_open_clip("wsolbench-clip-micro", "test")
    assert all(torch.equal(a, b) for a, b in zip(clip.state_dict().values(), model.state_dict().values()))
    assert tok("a photo of a star").shape[-1] == 16

    import torchvision

    spec = W.WeightSpec("test-squeezenet", "torchvision", "squeezenet1_1/IMAGENET1K_V1",
                        ("squeezenet1_1-b8a52dc0.pth",), "BSD-3-Clause", "test",
                        url="https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth")
    monkeypatch.setitem(W.CATALOGUE, spec.name, spec)
    ref = torchvision.models.get_model("squeezenet1_1", weights=None)
    out = env / "torch" / "hub" / "checkpoints" / "squeezenet1_1-b8a52dc0.pth"
    out.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), out)
    got = W.load_torchvision("test-squeezenet")
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), got.state_dict().values()))
