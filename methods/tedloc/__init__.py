"""TeD-Loc: text distillation for weakly supervised object localization.

Murtaza, Belharbi, Guichemerre, Pedersoli, Granger — "TeD-Loc: Text Distillation for Weakly Supervised Object
Localization" (arXiv 2501.12632). The class is :class:`wsolbench.methods.tedloc.method.TeDLoc`; its configs are
in ``configs/`` (``tedloc.yaml`` is the schema and the only defaults; [paper]/[CLIP-ES]/[DiPS]/[ours] there say
where each value comes from), its own pretrained models in ``weights.yaml``.

Modules: ``model`` (frozen encoder E, decoder D, classifier g, QR anchors), ``losses`` (L_KD, P_CL, I_CL),
``pseudo_labels`` (CLIP, CLIP-ES Grad-CAM pseudo-labels and their cache), ``sampling`` (FG/BG cells from a
pseudo-label map), ``train`` (training set, SGD loop, val selection), ``method`` (the registered class).

The paper's facts implemented (/work/shared/reference/methods.md)
    E  a frozen pretrained ViT (EVA ViT-L; ``encoder.variant`` eva01-l-196, as the paper cites EVA-01; the zoo
       ViT in the tiny profile) → patch embeddings (prefix tokens dropped);
    D  a trained decoder upsampling them to patch embeddings z_p in the CLIP text space;
    g  a trained binary FG/BG patch classifier on z_p, sigmoid → g(z_p) ∈ (0, 1);
    t  class anchors: CLIP text embeddings of the class names, orthogonalised by a QR decomposition and frozen
       (buffers in the checkpoint: inference never needs the text encoder); ``anchors.orthogonalize: false``
       is the paper's ablation. f(v, t_k) = <v, t_k>.
    Pseudo-labels: a CLIP Grad-CAM (CLIP-ES) of the ground-truth class; Otsu's threshold splits FG/BG; FG
       candidates = top-n⁺ activations, BG candidates = bottom-n⁻ outside FG; an equal number of FG and BG
       cells is drawn per image and re-sampled at every step; the rest is unlabelled.
    Losses: L_KD = CE(y, f(z_p, t)) over sampled FG cells (softmax over all anchors); P_CL = BCE(y'_p, g(z_p))
       over sampled FG (1) and BG (0) cells; I_CL = CE(y, f(h, t)) with h = Σ_p a_p z_p,
       a_p = g(z_p) / Σ_j g(z_j); L = λ1 L_KD + λ2 P_CL + λ3 I_CL (``losses``: λs and ablation switches).
    Training: SGD; CUB 50 epochs batch 16, ILSVRC 10 epochs batch 32; the model is selected on the val split
       (wsolevaluation protocol, GT-known MaxBoxAcc of the g maps at 256²; ``selection``; the scores are in the
       history and ``<out_dir>/selection.json``; without a val split the last epoch is kept, and said so).
    Inference (no label needed): maps = g(z_p) (class-agnostic, one copy per queried class); logits = f(h, t)
       (Top-1/Top-5 Loc); the second map <z_p, t_c> (supplementary B.1) is ``extras["zp_dot_t"]``.

Where this code differs, or fills what the paper leaves open (the official code is not reachable)
    - The pseudo-labels follow the CLIP-ES code the paper cites: CLIP ViT-B/16, prompt "a clean origami {}.",
      its background words less those naming a class or a synonym (CLIP-ES keeps one list per dataset), each
      image at its own size rounded up to the patch size; min-max normalised, cached as float16 .npy per image
      under ``<root>/<hash of the CLIP/prompt settings>/``. The FG/BG split follows the authors' DiPS code:
      Otsu on floor(cam·255), FG region eroded by an 11×11 kernel at 224 px (scaled to the z_p grid; the
      un-eroded region when erosion empties it), BG only among the lowest 20% of cells (F-CAM/DiPS).
    - n⁺/n⁻ are not given: 0 = every candidate; the cells drawn per step (``sampling.per_step``) are ours.
    - The decoder's layout is ours (1×1 conv, ``upsample_blocks`` × (×2 bilinear, 3×3 conv, norm, ReLU), 1×1 conv
      to the text width), and so are g's (1×1 conv or a small MLP), the optimiser's lr/momentum/decay and the
      cosine schedule.
    - The losses are means over the sampled cells instead of the paper's sums.
    - QR in class order: anchor k is the part of t_k orthogonal to t_0..t_{k-1}, sign kept so <anchor_k, t_k> > 0.
      With more classes than dimensions (ILSVRC: 1000 classes, 512-d CLIP B/16) exact orthonormality is
      impossible: the anchors are then the whitened embeddings (rows of Q from T = QR), re-normalised, with a
      warning.
    - Size: EVA-01 L/14 at 224 px plus this decoder is 308.7M parameters; the paper's Table 3 states 569.67M,
      which no EVA-L with this decoder reaches (``wsolbench profile --method tedloc`` measures ours).

Kept import-free: the registry reads the `@register_method` decorator in ``method.py`` without importing torch
(see :func:`wsolbench.registry.discover_methods`).
"""
