"""GenPromp's inference: the official pixels, one latent + noise draw per image, the cross-attention maps
recorded at the configured layers and timesteps, and their aggregation (the official ``diffusion_cam``)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from wsolbench.imaging import as_image_list, to_float_chw
from wsolbench.localizer import InputError
from wsolbench.maps.cross_attention import AttentionLayer, AttentionRecorder, select_layers

GROUP_KEYS = ("places", "levels", "blocks", "names")  # the filters of wsolbench.maps.cross_attention.select_layers
SOFTMAX_DTYPES = {"model": None, "float32": torch.float32}  # inference.softmax_dtype -> AttentionRecorder's


def official_pixels(img: Any, size: int, index: int = 0) -> torch.Tensor:
    """3×S×S in [-1, 1] as the official pipeline makes them: the uint8 RGB image, PIL bicubic resize to
    S×S, then x / 127.5 - 1 (computed in float64, stored float32). Non-PIL inputs become uint8 first
    (float images in [0, 1] are rounded to the nearest grey level)."""
    from PIL import Image

    if isinstance(img, Image.Image):
        pil = img.convert("RGB")
    elif isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3:
        pil = Image.fromarray(img)
    else:
        chw = to_float_chw(img, index)
        pil = Image.fromarray((chw.permute(1, 2, 0).numpy() * 255.0).round().clip(0, 255).astype(np.uint8))
    if pil.size != (size, size):
        pil = pil.resize((size, size), resample=Image.BICUBIC)
    arr = (np.asarray(pil, dtype=np.uint8) / 127.5 - 1.0).astype(np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


@dataclass
class LatentDraws:
    """Random draws given to the method instead of its own (``GenPromp.draws``), one row per image of a
    ``localize`` call: ``noise`` (B×C×h×w diffusion noise, shared by every timestep) and either ``z0``
    (B×C×h×w latents already × the VAE scaling factor; the VAE is then skipped) or ``vae_eps`` (B×C×h×w
    N(0, 1) of the posterior sample z0 = (mean + std·eps)·scaling). With neither, the VAE sample is drawn
    from torch's global generator."""

    noise: torch.Tensor
    z0: torch.Tensor | None = None
    vae_eps: torch.Tensor | None = None


def group_layers(layers: Sequence[AttentionLayer], groups: Sequence[dict]) -> list[list[AttentionLayer]]:
    """The layers of each configured group (``{places: [...], levels: [...]}``); empty groups are errors."""
    out = []
    for i, g in enumerate(groups):
        unknown = sorted(set(g) - set(GROUP_KEYS))
        if unknown:
            raise ValueError(f"inference.groups[{i}] = {g}: unknown key(s) {unknown}; a group filters layers by "
                             f"{', '.join(GROUP_KEYS)}")
        sel = select_layers(layers, **g)
        if not sel:
            have = sorted({(l.place, l.level) for l in layers})
            raise ValueError(f"inference.groups[{i}] = {g} matches no cross-attention layer of this U-Net; "
                             f"it has (place, level): {have}")
        out.append(sel)
    return out


def group_maps(layer_maps: dict[str, torch.Tensor], groups: Sequence[Sequence[AttentionLayer]],
               out_size: int) -> torch.Tensor:
    """Per group (the official ``diffusion_cam`` groups): the mean over its layers and the T timesteps of
    ``layer_maps[name]`` (Q×T×h×w, already averaged over heads), resized bicubic (cv2 INTER_CUBIC's kernel)
    to out_size. Returns G×Q×out_size×out_size float32."""
    per_group = []
    for layers in groups:
        stack = torch.stack([layer_maps[l.name].float().mean(dim=1) for l in layers], 0).mean(0)  # Q×h×w
        per_group.append(F.interpolate(stack[:, None], size=(out_size, out_size), mode="bicubic",
                                       align_corners=False)[:, 0])
    return torch.stack(per_group, 0)


def aggregate_maps(layer_maps: dict[str, torch.Tensor], groups: Sequence[Sequence[AttentionLayer]],
                   out_size: int, eps: float = 1e-12) -> torch.Tensor:
    """The official aggregation: the mean of the ``group_maps``, each map divided by its max.
    Returns Q×out_size×out_size float32."""
    cams = group_maps(layer_maps, groups, out_size).mean(0)
    return cams / cams.amax(dim=(-2, -1), keepdim=True).clamp_min(eps)


def image_generators(pixels: torch.Tensor, seed: int) -> list[torch.Generator]:
    """One generator per image, seeded by ``seed`` and the image's content: the same image gets the same VAE
    sample and noise in any batch, order or run (the official code draws once per batch)."""
    q = ((pixels.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    return [torch.Generator().manual_seed(
        int.from_bytes(hashlib.blake2b(im.tobytes(), digest_size=8, key=str(seed).encode()).digest(), "little")
        % (2**63)) for im in q]


class InferenceMixin:
    """Latents and attention maps for GenPromp: reads ``config["inference"]``, ``vae``, ``unet``,
    ``scheduler``, ``image_size``, ``infer_dtype``, ``draws``, ``groups`` and ``_record_layers``."""

    draws: Callable[[torch.Tensor], LatentDraws] | None

    def pixels(self, images: Any) -> torch.Tensor:
        """B×3×S×S in [-1, 1]: ``official_pixels`` of each image (the official test pipeline)."""
        return torch.stack([official_pixels(img, self.image_size, i) for i, img in enumerate(as_image_list(images))])

    def encode_latents(self, pixels: torch.Tensor, generators: Sequence[torch.Generator] | None = None,
                       eps: torch.Tensor | None = None) -> torch.Tensor:
        """z_0 = one posterior sample (``inference.latent: sample``) or the mean, x the VAE scaling factor.
        The sample's N(0, 1) draw: ``eps`` (B×C×h×w) when given, else one per image from ``generators`` (its
        draw then does not depend on the batch it came in), else torch's global generator."""
        vae_dtype = next(self.vae.parameters()).dtype
        dist = self.vae.encode(pixels.to(self.device, vae_dtype)).latent_dist
        if self.config["inference"]["latent"] == "mode":
            z = dist.mode()
        else:
            if eps is None:
                eps = (torch.stack([torch.randn(dist.mean.shape[1:], generator=g) for g in generators])
                       if generators is not None else torch.randn(dist.mean.shape))
            if tuple(eps.shape) != tuple(dist.mean.shape):
                raise InputError(f"VAE sample draw has shape {tuple(eps.shape)}, the posterior {tuple(dist.mean.shape)}")
            z = dist.mean + dist.std * eps.to(dist.mean.device, dist.mean.dtype)
        return z * float(self.vae.config.scaling_factor)

    def latents(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_0, noise) of each image of ``pixels``: the method's own per-image draws, or ``self.draws``'."""
        bs = int(self.config["inference"]["batch_size"])
        given = self.draws(pixels) if self.draws is not None else None
        gens = self._image_generators(pixels) if given is None else None
        if given is not None and given.z0 is not None:
            z0 = given.z0.to(self.device, next(self.vae.parameters()).dtype)
        else:
            eps = given.vae_eps if given is not None else None
            z0 = torch.cat([self.encode_latents(pixels[s:s + bs], None if gens is None else gens[s:s + bs],
                                                None if eps is None else eps[s:s + bs])
                            for s in range(0, len(pixels), bs)])
        noise = torch.stack([torch.randn(z0.shape[1:], generator=g) for g in gens]) if given is None else given.noise
        if tuple(noise.shape) != tuple(z0.shape):
            raise InputError(f"diffusion noise has shape {tuple(noise.shape)}, the latents {tuple(z0.shape)}")
        return z0, noise.to(z0)

    def _image_generators(self, pixels: torch.Tensor) -> list[torch.Generator]:
        """``image_generators`` seeded by ``inference.noise_seed``."""
        return image_generators(pixels, int(self.config["inference"]["noise_seed"]))

    @torch.no_grad()
    def attention_cams(self, pixels: torch.Tensor, query_image: Sequence[int], cond: torch.Tensor,
                       token_weights: torch.Tensor) -> torch.Tensor:
        """Maps (Q×S×S, max-normalised) for Q queries: query q reads image ``query_image[q]`` of
        ``pixels`` (B×3×H×W in [-1, 1]), is conditioned on ``cond[q]`` (L×D) and records the attention
        mixture ``token_weights[q]`` (L)."""
        z0, noise = self.latents(pixels)
        return aggregate_maps(self.layer_attention(z0, noise, query_image, cond, token_weights), self.groups,
                              int(self.config["inference"]["map_size"]))

    @torch.no_grad()
    def layer_attention(self, z0: torch.Tensor, noise: torch.Tensor, query_image: Sequence[int], cond: torch.Tensor,
                        token_weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """{layer name: Q×T×h×w}: the cross-attention probability of each recorded layer at each timestep,
        averaged over heads, for Q queries (query q: latents ``z0``/``noise`` of image ``query_image[q]``,
        conditioning ``cond[q]``, token mixture ``token_weights[q]``)."""
        inf = self.config["inference"]
        ts = [int(t) for t in inf["timesteps"]]
        if not ts or min(ts) < 0 or max(ts) >= self.scheduler.config.num_train_timesteps:
            raise ValueError(f"inference.timesteps must be 0-based scheduler indices in "
                             f"[0, {self.scheduler.config.num_train_timesteps - 1}], got {ts}")
        if inf["softmax_dtype"] not in SOFTMAX_DTYPES:
            raise ValueError(f"inference.softmax_dtype must be one of {sorted(SOFTMAX_DTYPES)}, "
                             f"got {inf['softmax_dtype']!r}")
        q_img = torch.as_tensor(list(query_image), dtype=torch.long, device=z0.device)
        n_q, n_t = len(q_img), len(ts)
        # item i = (query i // T, timestep i % T)
        item_q = torch.arange(n_q, device=z0.device).repeat_interleave(n_t)
        item_t = torch.tensor(ts, device=z0.device).repeat(n_q)
        cond = cond.to(self.device, self.infer_dtype)
        token_weights = token_weights.to(self.device, torch.float32)
        collected: dict[str, list[torch.Tensor]] = {l.name: [] for l in self._record_layers}
        rec = AttentionRecorder(self.unet, self._record_layers, stop_after_last=bool(inf["early_exit"]),
                                softmax_dtype=SOFTMAX_DTYPES[inf["softmax_dtype"]])
        with rec:
            for chunk in torch.arange(n_q * n_t, device=z0.device).split(int(inf["unet_batch"])):
                q, t = item_q[chunk], item_t[chunk]
                zt = self.scheduler.add_noise(z0[q_img[q]], noise[q_img[q]], t).to(self.infer_dtype)
                rec.set_token_weights(token_weights[q][:, None, :])
                rec.reset()
                rec.run(zt, t, encoder_hidden_states=cond[q])
                for name, m in rec.maps().items():
                    collected[name].append(m[:, 0])
        return {name: torch.cat(v).view(n_q, n_t, *v[0].shape[-2:]) for name, v in collected.items()}

    def _class_maps(self, imgs: list, per_image: list[list[int]]) -> torch.Tensor:
        """B×K×S×S maps of each image's K classes (``per_image``), ``inference.query_chunk`` queries at a time."""
        q_img = [i for i, qs in enumerate(per_image) for _ in qs]
        flat = [c for qs in per_image for c in qs]
        z0, noise = self.latents(self.pixels(imgs))
        step = max(1, int(self.config["inference"]["query_chunk"]))
        size = int(self.config["inference"]["map_size"])
        cams = [aggregate_maps(self.layer_attention(z0, noise, q_img[s:s + step], *self.class_conditioning(flat[s:s + step])),
                               self.groups, size) for s in range(0, len(flat), step)]
        cams = torch.cat(cams)
        return cams.view(len(imgs), len(per_image[0]), *cams.shape[-2:]).float().cpu()
