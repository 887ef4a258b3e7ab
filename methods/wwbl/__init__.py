"""WWbL, "What is Where by Looking" (Shaharabany, Tewel & Wolf, NeurIPS 2022).

What the paper describes (implemented here):

- A network g maps an image (and, for grounding, a CLIP text embedding z_t) to a [0, 1] map. It is trained
  with a frozen CLIP as the only supervision: L_fore = −CLIP(g∘I, t), L_back = CLIP((1−g)∘I, t),
  L_rmap = ||H − g||² with H the CLIP relevancy map of (I, t) (Chefer et al.'s rollout;
  ``wsolbench.maps.clip_relevancy``), L_reg = ||g||; weights 1, 1, 4, 1.
- WSOL (``mode: wsol``, CUB Table 2): g is a U-Net on an ImageNet backbone (VGG16, MobileNetV1, ResNet50,
  InceptionV3, DenseNet161), no text input; CLIP's text is the dataset's object name ("bird"); 224 input
  (train: resize 256, crop 224, flip), SGD lr 3e-4, batch 48, 100 epochs; the box: zero below 0.1·max, the
  largest contour (the ``wwbl-cub`` protocol scores it).
- Grounding (``mode: grounding``, Flickr30k Tables 6-7): g = VGG16 encoder, per-location cosine with z_t,
  decoder of x2 upsampling blocks, sigmoid; trained on COCO-2014 captions at 299 px, lr 3e-4.
- The open world ("what is where", no text input): selective-search proposals → a BLIP caption per proposal
  → CLIP text embeddings → community detection (cosine ≥ 0.85, clusters of ≥ 2) → g's map and a box per
  cluster caption; scored by matching each GT phrase to the closest caption in CLIP space.

Where the official code (talshaharabany/what-is-where-by-looking) differs, and what ``recipe: official`` (the
default, what produced the published numbers) follows:

- loss 0.25·mean(1 − Z_fg·Z_tᵀ) + 0.5·mean|Z_bg·Z_tᵀ| over the full B×B batch matrices + 16·MSE(M, R) +
  0.25·mean(M); R = the last visual block's relevancy only; SGD lr 0.0012, 304 px, horizontal flip
  (``recipe: paper-text`` is the paper's weights, rollout, lr 3e-4, 299 px);
- E = VGG16 ``features[:23]`` (relu4_3, stride 8, not the paper's 16); decoder bottleneck → cosine map →
  up0 → up1 (conv 512→1, BN, ReLU, conv 1→1) → align-corners resize → sigmoid; VGG's and CLIP's input
  normalised with 0.5; the checkpoint's key names (``module.E.Org_model.*``, ``module.D.*``) load as they are;
- text "image of " + the lower-cased phrase at test time; captions with each word kept with p = 0.8;
  model selection by pointing accuracy on a validation split;
- the WSOL U-Net decoder is ``base.SkipDecoder`` over VGG16Net's taps 3, 4, 8, 15, 22, 29; the repository has
  no WSOL trainer, so ``configs/wwbl_cub.yaml`` is the paper's text;
- open world: OpenCV selective search (fast) plus 1/2, 1/3, 1/4 grid boxes, kept above 0.1·224²; BLIP base
  (CapFilt-L) with the prompt "a picture of ", beam 3, length 5-30; an image without a caption cluster is
  skipped by the official metric (here: NaN maps, counted by the harness's ``wwbl-open`` row).

Modules: ``method`` (the registered ``WWbL``: config, inference, persistence), ``model`` (g, its encoders,
the official checkpoint's keys), ``clip_teacher`` (the frozen CLIP), ``losses``, ``data`` (the text-image
training set), ``train`` (fit, model selection), ``open_world`` (proposals → captions → clusters).
Kept import-free: the registry reads the ``@register_method`` decorator without importing torch (see
:func:`wsolbench.registry.discover_methods`).
"""
