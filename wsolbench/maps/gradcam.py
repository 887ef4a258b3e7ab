"""A small, layer-agnostic Grad-CAM (Selvaraju et al., ICCV 2017) written on forward hooks.

Works on any ``nn.Module`` layer: CNN layers give B×D×h×w activations directly; token layers (ViT/CLIP
blocks, B×N×D or N×B×D) pass a ``reshape`` callback that turns the activation — and, with the same call, its
gradient — into B×D×h×w (e.g. ``tokens_to_map(grid=(7, 7), drop_prefix=1)``). Frozen models work too: when
the hooked activation does not require grad it is re-attached as a leaf that does.

    maps, out = grad_cam(model, model.layer4, images, targets=[[3], [5]])          # logits model
    maps, out = grad_cam(clip.visual, "transformer.resblocks.11", images,          # any score
                         score_fn=lambda feats: feats @ text_emb.T, targets=[[0]] * B,
                         reshape=tokens_to_map((7, 7), drop_prefix=1, seq_first=False))

Maps are raw (ReLU'd weighted sums at the layer's resolution); normalising/resizing is the caller's job.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

Reshape = Callable[[torch.Tensor], torch.Tensor]


def tokens_to_map(grid: tuple[int, int] | None = None, drop_prefix: int = 1, seq_first: bool = False) -> Reshape:
    """A ``reshape`` callback for token activations: (B×N×D, or N×B×D if ``seq_first``) → B×D×h×w.

    Drops ``drop_prefix`` leading tokens (CLS / register tokens); ``grid`` defaults to a square grid.
    """

    def reshape(t: torch.Tensor) -> torch.Tensor:
        if t.ndim != 3:
            raise ValueError(f"tokens_to_map expects a 3-D token tensor, got shape {tuple(t.shape)}")
        if seq_first:
            t = t.transpose(0, 1)
        t = t[:, drop_prefix:, :]
        b, n, d = t.shape
        h, w = grid if grid is not None else (int(round(n ** 0.5)),) * 2
        if h * w != n:
            raise ValueError(f"{n} tokens (after dropping {drop_prefix}) do not form a {h}×{w} grid; pass grid=")
        return t.transpose(1, 2).reshape(b, d, h, w)

    return reshape


class ActivationHook:
    """Captures a layer's output during a forward pass (the last call wins) as a tensor that requires grad."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.activation: torch.Tensor | None = None
        self._handle = None

    def __enter__(self) -> "ActivationHook":
        self._handle = self.layer.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        first = output[0] if isinstance(output, (tuple, list)) else output
        if not torch.is_tensor(first):
            raise TypeError(f"Grad-CAM layer {type(module).__name__} returned {type(first).__name__}, not a tensor")
        replaced = first
        if not first.requires_grad:  # frozen or no-grad upstream: make this activation a grad leaf
            replaced = first.detach().requires_grad_(True)
        self.activation = replaced
        if replaced is first:
            return None
        if isinstance(output, tuple):
            return (replaced, *output[1:])
        if isinstance(output, list):
            return [replaced, *output[1:]]
        return replaced


def resolve_layer(model: nn.Module, layer: nn.Module | str) -> nn.Module:
    if isinstance(layer, nn.Module):
        return layer
    try:
        return model.get_submodule(layer)
    except AttributeError as exc:
        names = [n for n, _ in model.named_modules() if n][:20]
        raise ValueError(f"no submodule {layer!r} in {type(model).__name__}; some names: {names}") from exc


def cam_from_gradients(activation: torch.Tensor, gradient: torch.Tensor, relu: bool = True) -> torch.Tensor:
    """Grad-CAM for B×D×h×w activation/gradient: ReLU(Σ_d mean_hw(∂y/∂A_d) · A_d) → B×h×w."""
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    cam = (weights * activation).sum(dim=1)
    return cam.clamp_min(0) if relu else cam


def grad_cam(model: nn.Module, layer: nn.Module | str, inputs: Any,
             targets: Sequence[Sequence[int]] | Sequence[int] | None = None, *,
             score_fn: Callable[[Any], torch.Tensor] | None = None, forward: Callable[[Any], Any] | None = None,
             reshape: Reshape | None = None, relu: bool = True) -> tuple[torch.Tensor, Any]:
    """Grad-CAM maps (B×K×h×w, float32, detached) for ``targets`` and the model output.

    ``forward(inputs)`` (default ``model(inputs)``) runs the model; ``score_fn(output)`` → B×C scores
    (default: the output itself, i.e. logits). ``targets``: one int or one list of ints per image; None →
    each image's arg-max score (K=1). Batch items must not interact (eval-mode BatchNorm), since the
    gradient of the batch sum is used per target.
    """
    layer_mod = resolve_layer(model, layer)
    run = forward if forward is not None else model
    with torch.enable_grad(), ActivationHook(layer_mod) as hook:
        output = run(inputs)
        scores = score_fn(output) if score_fn is not None else output
        if not torch.is_tensor(scores) or scores.ndim != 2:
            raise ValueError("Grad-CAM needs B×C scores: pass score_fn mapping the model output to a B×C tensor "
                             f"(got {type(scores).__name__} {tuple(getattr(scores, 'shape', ()))})")
        if hook.activation is None:
            raise RuntimeError(f"layer {type(layer_mod).__name__} was not called during the forward pass")
        act = hook.activation
        b = scores.shape[0]
        if targets is None:
            tgt = scores.detach().argmax(dim=1, keepdim=True).tolist()
        else:
            tgt = [[int(t)] if isinstance(t, (int,)) or (torch.is_tensor(t) and t.ndim == 0) else [int(x) for x in t]
                   for t in targets]
            if len(tgt) != b or len({len(t) for t in tgt}) != 1:
                raise ValueError(f"targets must give the same number of classes for each of the {b} images")
        idx = torch.as_tensor(tgt, device=scores.device)  # B×K
        chosen = scores.gather(1, idx)  # B×K
        maps = []
        k = idx.shape[1]
        for j in range(k):
            (grad,) = torch.autograd.grad(chosen[:, j].sum(), act, retain_graph=j < k - 1)
            a, g = (reshape(act), reshape(grad)) if reshape is not None else (act, grad)
            if a.ndim != 4:
                raise ValueError(f"activation has shape {tuple(act.shape)}; pass reshape= to turn it into B×D×h×w "
                                 "(e.g. wsolbench.maps.gradcam.tokens_to_map)")
            maps.append(cam_from_gradients(a.detach().float(), g.detach().float(), relu=relu))
    return torch.stack(maps, dim=1), output


class GradCAM:
    """Grad-CAM bound to a model and a layer: ``GradCAM(model, "layer4")(images, targets)`` → B×K×h×w."""

    def __init__(self, model: nn.Module, layer: nn.Module | str, *, reshape: Reshape | None = None,
                 score_fn: Callable[[Any], torch.Tensor] | None = None, relu: bool = True) -> None:
        self.model = model
        self.layer = resolve_layer(model, layer)
        self.reshape = reshape
        self.score_fn = score_fn
        self.relu = relu

    def __call__(self, inputs: Any, targets=None, forward: Callable[[Any], Any] | None = None) -> torch.Tensor:
        maps, _ = grad_cam(self.model, self.layer, inputs, targets, score_fn=self.score_fn, forward=forward,
                           reshape=self.reshape, relu=self.relu)
        return maps
