"""GenPromp (Zhao et al., ICCV 2023): WSOL as conditional image denoising with generative prompts.

The paper
---------
* Model: a latent diffusion model (VAE, cross-attention U-Net ε_θ, CLIP text encoder; Stable Diffusion v1.4)
  plus an off-the-shelf test-time classifier for the category (EfficientNet-B7).
* Discriminative embedding f_d: the text encoding of "a photo of a {meta token}", the meta token being the
  last word of the class name's first synonym.
* Representative embedding f_r: one new token per class (the concept token), its input embedding
  initialised from the meta token's and learned with the denoising loss L = E||ε − ε_θ(z_t, t, f)||² on that
  class's images, everything else frozen (2 epochs, lr 5e-5, AdamW betas 0.9/0.999, wd 1e-2, eps 1e-8).
* Finetuning: the U-Net is finetuned with both prompts.
* Inference: f_c = w·f_r + (1 − w)·f_d (w = 0.6); z_0 from the VAE, noised at t ∈ {1, 100}, one U-Net pass
  per t conditioned on f_c; the cross-attention maps of the class token at the 8x8 and 16x16 resolutions
  (for a 64x64 latent), each normalised by its max, averaged over layers and timesteps, upsampled, thresholded,
  boxed. Ablations as config switches: ``prompts.embedding`` (f_d / f_r / f_c), ``inference.timesteps``,
  ``inference.groups`` (resolutions), ``inference.finetuned``.

Where the official code (callsys/GenPromp) differs, and what this package follows (it follows the code)
---------------------------------------------------------------------------------------------------------
* Meta token: ``prompts.meta_token`` when set ("bird" for every CUB class), else the code's rule on the class's
  FULL name: of its comma-separated synonyms, each one's LAST word, the first that is a single tokenizer token,
  else the last BPE piece of the first ("electric ray, crampfish" -> "ray", "hammerhead, hammerhead shark" ->
  "shark"); the full names are ``class_synonyms`` (the harness passes the dataset's: ILSVRC's synset mapping).
* Prompts average the text-encoder ``last_hidden_state`` over 7 templates (``prompts.templates``); concept
  tokens ``<cub-{i}>`` get ids 49408 + i; the attention is read at the class word's position (index 5 of
  "<bos> a photo of a X", ``prompts.token_index``).
* Stage 1 (``train.stage1``, per class, CUB batch 4 × 2 epochs; the paper says batch 8): lr 5e-5 × total batch
  (``scale_lr``); one AdamW over the whole token-embedding matrix of one text encoder shared by the classes in
  turn, so earlier classes' steps decay later rows (``weight_decay_scope: vocabulary``). Here each row is its own
  Parameter (``components.ConceptTokenEmbedding``) and classes may run side by side (``parallel_classes``),
  exactly equivalent to one by one. Stage 2 (``train.stage2``) finetunes the whole U-Net with 0.5·f_r + 0.5·f_d
  (CUB lr 5e-6, batch 4 × accumulation 16, 250 steps, but the U-Net kept is the last one saved, step 239:
  ``checkpoint_step``), not the paper's 100,000 iterations at lr 5e-8, batch 128. Seed 1234; augmentation Resize,
  RandomCrop, HorizontalFlip, ColorJitter(0.1 x4). Both stages resume and write the official layout:
  ``tokens/{token_id}.bin`` = ``{token: tensor[768]}`` and ``unet/`` (diffusers ``save_pretrained``); official
  checkpoints load through ``model.token_path`` / ``model.unet_path``.
* Inference (``inference``): uint8 RGB, PIL bicubic resize to 512, x/127.5 − 1; z_0 = one VAE posterior sample
  × 0.18215; timesteps are 0-based scheduler indices, the paper's t = 1 and t = 100 being 0 and 99; the same
  noise at both. The code draws noise once per batch; here each image's draw is seeded by its content
  (``inference.noise_seed``: batch-invariant), or supplied through ``GenPromp.draws`` (the parity test feeds
  the official run's). Attention probabilities use an explicit softmax (in the U-Net's dtype as the fp16
  official run, or float32: ``inference.softmax_dtype``), recorded with ``wsolbench.maps.cross_attention``
  (the code patched a diffusers 0.13 internal). Aggregation (``diffusion_cam``): three groups (every 8x8 map,
  the 16x16 maps of the up path, those of the down path), each averaged over heads, layers and timesteps,
  resized bicubic to 64, the groups averaged, divided by the max.
* Boxes (the ``genpromp`` protocol): the map resized to 512 (bilinear), min-max to uint8, zero below
  ``cam_thr``·max (0.23 CUB, 0.25 ImageNet), the largest contour's box; TS-CAM-style IoU (+1 convention).
* Classifier: predictions as a JSON ``{image name: {"pred_scores": [C floats]}}`` (``classifier.kind: json``,
  read by image id; a missing id is an error), or a timm model, or the zoo's. Top-1/Top-5 Loc count a
  prediction only when it is the GT class (the official top1/top5 modes). Capabilities: ``single`` and
  ``phrase`` ("a photo of a {phrase}", f_d only, the attention averaged over the phrase's tokens), not
  ``multi`` (C U-Net passes per image, never done in the paper).

Layout: ``method`` (the registered class), ``components``, ``prompts``, ``classifier``, ``inference``,
``train``; configs in ``configs/`` (``genpromp.yaml`` is the schema and the only defaults), pretrained models
in ``weights.yaml``. Kept import-free: the registry reads the ``@register_method`` decorator without importing
torch (see :func:`wsolbench.registry.discover_methods`).
"""
