"""GenPromp against the official code (callsys/GenPromp @ c480e0a, ``test()`` in gtk mode) on recipe weights.

The fixture ``../shared/fixtures/parity/genpromp/`` (see its README) lists the official checkpoint's tensor
names and shapes; the weights are a pure function of (seed, name, shape) (``recipe.py``). This test writes
the official-format folders (the SD v1.4-layout folder, ``tokens/{id}.bin``, the finetuned diffusers
``unet/``), loads them through the paper profile's config keys (``model.pretrained``, ``model.token_path``,
``model.unet_path``), feeds the official run's recorded draws through the public ``GenPromp.draws`` hook,
and compares every stage with the official outputs at the README's tolerances: text embeddings (f_d, f_r,
f_c), the latents, each cross-attention layer's map, the three group maps, the final map.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from wsolbench.config import load_method_config  # noqa: E402

TOL_MAPS, TOL_LAYERS, TOL_TEXT, TOL_Z0_REL = 5e-4, 1e-5, 1e-4, 1e-3  # the fixture README's tolerances
MODULES = (("unet", "unet/diffusion_pytorch_model.bin"), ("vae", "vae/diffusion_pytorch_model.bin"),
           ("text_encoder", "text_encoder/pytorch_model.bin"))

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_official_layout(fixture: Path, recipe, out: Path) -> tuple[Path, Path]:
    """``out/sd`` (the SD v1.4-layout folder) and ``out/ckpt`` (``tokens/`` + finetuned ``unet/``), written
    from keys.json + the configs with the recipe, as the official run's ``save_pretrained`` wrote them."""
    from wsolbench.zoo.tokenizers import write_clip_bpe_files

    meta = json.loads((fixture / "keys.json").read_text())
    seed, gain = int(meta["seed"]), float(meta["gain"])
    sd, ckpt = out / "sd", out / "ckpt"
    shutil.copytree(fixture / "configs", sd)
    write_clip_bpe_files(sd / "tokenizer")
    keys = {name: recipe.load_keys(fixture / "keys.json", f"components.{name}") for name, _ in MODULES}
    for name, rel in MODULES:  # the SD folder's own U-Net differs on purpose (seed + offset): test() never reads it
        s = seed + int(meta["base_unet_seed_offset"]) if name == "unet" else seed
        torch.save(recipe.state_dict_for(keys[name], s, gain), sd / rel)
    (ckpt / "unet").mkdir(parents=True)
    shutil.copy(sd / "unet" / "config.json", ckpt / "unet" / "config.json")
    torch.save(recipe.state_dict_for(keys["unet"], seed, gain), ckpt / "unet" / "diffusion_pytorch_model.bin")
    (ckpt / "tokens").mkdir()
    for i, (token, shape) in enumerate(recipe.load_keys(fixture / "keys.json", "components.tokens")):
        value = torch.from_numpy(recipe.tensor_for(token, shape, seed, gain))
        torch.save({token: value}, ckpt / "tokens" / f"{int(meta['token_id_offset']) + i}.bin")
    return sd, ckpt


@pytest.fixture(scope="module")
def fixture_dir(parity_fixture) -> Path:
    return parity_fixture("genpromp")


@pytest.fixture(scope="module")
def official(fixture_dir):
    with np.load(fixture_dir / "expected.npz") as z:
        expected = {k: z[k] for k in z.files}
    with np.load(fixture_dir / "latents_noise.npz") as z:
        draws = {k: torch.from_numpy(z[k]) for k in z.files}
    inputs = json.loads((fixture_dir / "inputs" / "inputs.json").read_text())["images"]
    return expected, draws, inputs


@pytest.fixture(scope="module")
def method(fixture_dir, parity_recipe, tmp_path_factory):
    """The paper profile (CUB) on the official-format folders, through the config keys a user sets."""
    from wsolbench.methods.genpromp.method import GenPromp

    sd, ckpt = write_official_layout(fixture_dir, parity_recipe, tmp_path_factory.mktemp("genpromp-official"))
    cfg = load_method_config("genpromp", profile="paper", dataset_key="cub", overrides=[
        f"model.pretrained={sd}", f"model.token_path={ckpt / 'tokens'}", f"model.unet_path={ckpt / 'unet'}",
        "classifier.kind=none"])
    m = GenPromp.from_config(cfg, class_names=[f"{i + 1:03d}.class_{i + 1}" for i in range(200)])
    assert m.unet_finetuned
    return m


def _images(fixture_dir, inputs):
    from PIL import Image

    return [Image.open(fixture_dir / "inputs" / im["file"]) for im in inputs]


def _feed(method, **draws):
    from wsolbench.methods.genpromp.inference import LatentDraws

    method.draws = lambda pixels: LatentDraws(**draws)


def test_text_embeddings_match(method, official):
    expected, _, inputs = official
    for i, im in enumerate(inputs):
        for key, mode in (("f_d", "discriminative"), ("f_r", "representative"), ("f_c", "combined")):
            got = method.class_embedding(im["class_id"], mode).numpy()
            assert np.abs(got - expected[key][i]).max() < TOL_TEXT, (key, im["file"])


def test_layer_group_and_final_maps_from_the_official_latents(method, official, fixture_dir):
    """Same z0 and noise as the official run: each layer's map per timestep, each group map, the final map."""
    from wsolbench.methods.genpromp.inference import group_maps

    expected, draws, inputs = official
    classes = [im["class_id"] for im in inputs]
    cond, weights = method.class_conditioning(classes)
    layers = method.layer_attention(draws["z0"], draws["noise"], range(len(classes)), cond, weights)
    names = sorted(k[len("layer/"):] for k in expected if k.startswith("layer/"))
    assert sorted(layers) == names  # the recorded layers are exactly the official groups' layers
    for name in names:
        assert np.abs(layers[name].numpy() - expected[f"layer/{name}"]).max() < TOL_LAYERS, name
    groups = group_maps(layers, method.groups, int(method.config["inference"]["map_size"]))
    assert json.loads(str(expected["group_names"])) == ["8x8 up+mid+down", "16x16 up", "16x16 down"]
    assert np.abs(groups.transpose(0, 1).numpy() - expected["group_maps"]).max() < TOL_LAYERS
    try:
        _feed(method, z0=draws["z0"], noise=draws["noise"])
        out = method.localize(_images(fixture_dir, inputs), classes=classes)
    finally:
        method.draws = None
    assert np.abs(out.maps[:, 0].numpy() - expected["maps"]).max() < TOL_MAPS


def test_end_to_end_from_the_images(method, official, fixture_dir):
    """From the PNGs: wsolbench's preprocessing and VAE with the official VAE-sample draw and noise."""
    expected, draws, inputs = official
    pixels = method.pixels(_images(fixture_dir, inputs))
    _feed(method, vae_eps=draws["vae_eps"], noise=draws["noise"])
    try:
        z0, _ = method.latents(pixels)
        out = method.localize(_images(fixture_dir, inputs), classes=[im["class_id"] for im in inputs])
    finally:
        method.draws = None
    ref = draws["z0"].numpy()
    assert (np.abs(z0.numpy() - ref) / (1 + np.abs(ref))).max() < TOL_Z0_REL
    assert np.abs(out.maps[:, 0].numpy() - expected["maps"]).max() < TOL_MAPS



@pytest.mark.parametrize("section, key, slip", [("prompts", "token_index", 6), ("inference", "timesteps", [1, 100])])
def test_the_comparison_catches_a_slip(method, official, section, key, slip):
    """The tolerance separates the official recipe from a one-setting slip (README: 0.07 to 0.59 apart; a
    changed combine ratio or template already fails the f_c comparison)."""
    from wsolbench.methods.genpromp.inference import aggregate_maps

    expected, draws, inputs = official
    before = method.config[section][key]
    method.config[section][key] = slip
    method._cache.clear()
    try:
        cond, weights = method.class_conditioning([im["class_id"] for im in inputs])
        maps = aggregate_maps(method.layer_attention(draws["z0"], draws["noise"], range(len(inputs)), cond, weights),
                              method.groups, int(method.config["inference"]["map_size"]))
    finally:
        method.config[section][key] = before
        method._cache.clear()
    assert np.abs(maps.numpy() - expected["maps"]).max() > 100 * TOL_MAPS
