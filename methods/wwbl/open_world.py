"""WWbL without text input ("what is where"): proposals (``wsolbench.maps.proposals``) → a caption per
proposal → CLIP text embeddings → community detection (``wsolbench.maps.clustering``) → one g map and one
grounding box per cluster caption; and the matching of GT phrases to the predicted captions."""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from wsolbench.localizer import LocalizerOutput


@dataclass
class OpenWorldResult:
    """WWbL's answer for one image without text input."""

    boxes: np.ndarray  # (N, 4) x0, y0, x1, y1, original pixels
    captions: list[str]  # N cluster captions
    maps: torch.Tensor  # N×S×S, g's maps for the captions (raw, in [0, 1])
    embeddings: torch.Tensor  # N×D normalised CLIP text embeddings of the captions
    proposals: np.ndarray  # (P, 4) the proposals that were captioned
    proposal_captions: list[str]
    clusters: list[list[int]]  # indices into the proposals


class OpenWorldMixin:
    """The open-world mode of a ``WWbL`` (the host provides ``config``, ``device``, ``clip``, ``input_size``,
    ``g_maps``, ``query_text``, ``_g_input`` and ``_images01``, and calls ``_init_open_world``)."""

    def _init_open_world(self, captioner: Any) -> None:
        self._captioner = captioner
        self._open_cache: OrderedDict[str, OpenWorldResult] = OrderedDict()
        self.open_skipped: set[str] = set()  # images (content hashes) where the pipeline found no cluster

    def _localize_open(self, imgs: list) -> LocalizerOutput:
        """Per image the maps of its cluster captions (zero-padded to the batch's most), boxes and captions."""
        results = [self.open_world(img) for img in imgs]
        n = max([len(r.captions) for r in results] + [1])
        s = self.input_size
        maps = torch.zeros(len(imgs), n, s, s)
        for i, r in enumerate(results):
            if len(r.captions):
                maps[i, : len(r.captions)] = r.maps
        return LocalizerOutput(maps=maps, boxes=[r.boxes for r in results], captions=[r.captions for r in results],
                               extras={})

    @property
    def captioner(self) -> Any:
        """The captioner given at construction, else the ``captioner`` group's (built on first use)."""
        if self._captioner is None:
            self._captioner = build_captioner(self.config, self.device)
        return self._captioner

    def caption_crops(self, crops: list) -> list[str]:
        """One caption per crop: a callable captioner as it answers; a transformers BLIP (model, processor)
        prompted with ``captioner.prompt`` (BLIP's "a picture of "), beam search, the prompt removed."""
        if callable(self.captioner) and not isinstance(self.captioner, tuple):
            return [str(c).strip() for c in self.captioner(crops)]
        model, processor = self.captioner
        c = self.config["captioner"]
        prompt = c["prompt"] or ""  # null: no prompt
        out: list[str] = []
        bs = int(c["batch_size"])
        for i in range(0, len(crops), bs):
            batch = crops[i:i + bs]
            kw = {"text": [prompt] * len(batch)} if prompt else {}
            inputs = processor(images=batch, return_tensors="pt", **kw)
            gen = dict(num_beams=int(c["num_beams"]), max_length=int(c["max_length"]), do_sample=False)
            if c["min_length"]:  # 0: the model's own minimum
                gen["min_length"] = int(c["min_length"])
            if prompt:
                gen["input_ids"] = inputs["input_ids"].to(model.device)
            with torch.no_grad():
                ids = model.generate(pixel_values=inputs["pixel_values"].to(model.device), **gen)
            out += [strip_prompt(t, prompt) for t in processor.batch_decode(ids, skip_special_tokens=True)]
        return out

    def open_world(self, image: Any) -> OpenWorldResult:
        """WWbL without text: proposals → captions → CLIP clustering → one g map and one box per cluster.

        Results are cached per image content (the harness asks once per phrase)."""
        from PIL import Image

        from wsolbench.maps.clustering import closest_to_centroid, community_detection
        from wsolbench.maps.proposals import wwbl_proposals

        pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        pil = pil.convert("RGB")
        key = hashlib.sha1(np.asarray(pil).tobytes() + str(pil.size).encode()).hexdigest()
        if key in self._open_cache:
            self._open_cache.move_to_end(key)
            return self._open_cache[key]
        o = self.config["open"]
        w0, h0 = pil.size
        size = int(o["proposal_size"])
        # selective search sees g's normalised input at 224 (official); crops come from the PIL image resized
        # to 224 (PIL's default bicubic, as the official np_img)
        ss_input = self._g_input(self._images01([pil], size=size))[0].permute(1, 2, 0).contiguous().numpy()
        boxes224 = wwbl_proposals(ss_input, mode=o["selective_search"], grid_fractions=tuple(o["grid_fractions"]),
                                  min_area_frac=float(o["min_area_frac"]), max_proposals=o["max_proposals"])
        small = pil.resize((size, size), Image.BICUBIC)
        crops = [small.crop(tuple(int(v) for v in b)) for b in boxes224]
        props = (boxes224 * np.array([w0 / size, h0 / size, w0 / size, h0 / size])).astype(np.float32)
        captions = self.caption_crops(crops) if crops else []
        emb = self.clip.encode_text(captions) if captions else torch.zeros(0, self.clip.embed_dim)
        clusters = community_detection(emb.cpu(), threshold=float(o["cluster_threshold"]),
                                       min_size=int(o["cluster_min_size"])) if captions else []
        if not clusters:
            self.open_skipped.add(key)
        names = [captions[closest_to_centroid(emb.cpu(), c)] for c in clusters]
        if names:
            x01 = self._images01([pil])
            with torch.no_grad():
                maps = self.g_maps(x01.expand(len(names), -1, -1, -1), names, as_query=False)[:, 0].float().cpu()
            boxes = np.stack([self.map_box(m.numpy(), (w0, h0)) for m in maps]).astype(np.float32)
            name_emb = self.clip.encode_text(names).cpu()
        else:
            maps = torch.zeros(0, self.input_size, self.input_size)
            boxes = np.zeros((0, 4), np.float32)
            name_emb = torch.zeros(0, emb.shape[-1] if emb.ndim == 2 else self.clip.embed_dim)
        res = OpenWorldResult(boxes=boxes, captions=names, maps=maps, embeddings=name_emb, proposals=props,
                              proposal_captions=captions, clusters=clusters)
        self._open_cache[key] = res
        while len(self._open_cache) > int(o["cache_size"]):
            self._open_cache.popitem(last=False)
        return res

    def match_captions(self, phrase_groups: Sequence[Sequence[str]], caption_embeddings: torch.Tensor) -> list[int]:
        """For each GT entity (one or more phrases), the index of the closest predicted caption in CLIP space:
        argmax over captions of <mean of the phrases' normalised embeddings, caption embedding> (the official
        metric: the GT phrases as test queries, ``query_text``; the captions as generated)."""
        out = []
        cap = F.normalize(caption_embeddings.float().cpu(), dim=-1)
        for phrases in phrase_groups:
            z = self.clip.encode_text([self.query_text(p) for p in phrases]).cpu().mean(dim=0)
            out.append(int(torch.argmax(cap @ z)))
        return out

    def map_box(self, m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """The grounding box (x0, y0, x1, y1 in original pixels) of a map: resized (bilinear) to the image,
        then the WWbL rule (min-max, zero below 0.5·max, a box per contour scored by its mean, NMS 0.05, keep
        > 0.5 × best, union): ``wsolbench.metrics.grounding.generate_box``."""
        import cv2

        from wsolbench.metrics.grounding import generate_box

        w, h = size
        resized = cv2.resize(np.asarray(m, np.float32), (int(w), int(h)), interpolation=cv2.INTER_LINEAR)
        return np.asarray(generate_box(resized.astype(np.float64)), np.float32)


def strip_prompt(caption: str, prompt: str) -> str:
    """A BLIP caption without its prompt (BLIP's ``generate`` returns ``caption[len(prompt):]``)."""
    caption, stem = caption.strip(), prompt.strip()
    return caption[len(stem):].strip() if stem and caption.lower().startswith(stem.lower()) else caption


def build_captioner(cfg: dict, device: str) -> tuple[Any, Any]:
    """The ``captioner`` group's (model, processor): a transformers BLIP or the zoo's captioner, in eval mode."""
    c = cfg["captioner"]
    source = c["source"]
    if source in ("zoo", "zoo-random"):
        from wsolbench import zoo

        model, processor = zoo.load_captioner(c["scale"]) if source == "zoo" else zoo.create_captioner(c["scale"])
    elif source == "transformers":
        from wsolbench.weights import load_blip

        model, processor = load_blip(c["weights"], device=device)
    else:
        raise ValueError(f"captioner.source must be transformers, zoo or zoo-random, got {source!r}")
    return model.to(device).eval(), processor
