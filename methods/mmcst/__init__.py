"""MMCST: multi-modal class-specific tokens for weakly supervised dense object localization.

Xu, Ouyang, Bennamoun, Boussaid, Xu — "Learning Multi-Modal Class-Specific Tokens for Weakly Supervised Dense
Object Localization", CVPR 2023. MMCST's code is not public; it builds on MCTformer (Xu et al., CVPR 2022,
xulianuwa/MCTformer), whose code fills in what the paper leaves open (marked (M) below and in the YAML).

What the paper states (implemented as given)
    * A ViT-B/16 reads ``[C class tokens | C text tokens | N patch tokens]`` + learned position embeddings; the
      class tokens start from the pretrained ViT class token; the text tokens are the CLIP ViT-B/16 text
      embeddings of ``"a photo of <class>"``, kept constant.
    * Masked self-attention: the class-token and text-token groups do not attend to each other (Fig. 3).
    * L_cls: class scores = the output class tokens averaged over channels, multi-label soft margin (MLSM).
    * Token fusion: T_txt = T_txt_in + λ1·T_txt_out, T_cls = T_cls_in + λ2·T_cls_out, λ1, λ2 learnable.
    * Patch tokens linearly projected to F; C_t2p = F·T_txtᵀ, C_c2p = F·T_clsᵀ, each pooled to class scores by
      global weighted ranking pooling (GWRP) and supervised with MLSM.
    * L_contrast: the B per-image means of the output text tokens vs the B CLIP image embeddings of the batch,
      similarity matrix S (B×B), cross-entropy with the identity as target.
    * L_total = L_cls + L_text-patch + L_class-patch + L_contrast.
    * Maps: C_mm = C_t2p + C_c2p; M̂ = C_mm ∘ A_c2p (class-to-patch attention); M = A_p2p · M̂ (patch-to-patch
      refinement); upsampled, min-max normalised per class.
    * Training: Adam, lr 5e-4, batch 32, 60 epochs (VOC, COCO), 10 (OpenImages). Evaluation: mIoU on VOC 2012
      train / COCO 2014 train; pIoU and PxAP on OpenImages test.

Where MCTformer's code (M) or our reading fills a gap
    * Backbone weights: DeiT-B/16 (MCTformer builds only DeiT models); vit-b16 (augreg2) is the other reading.
    * C class tokens = the pretrained class token and its position embedding repeated (M); final norm not
      applied to the output tokens (M); GWRP decay 0.996 (M); drop path 0.1 (M).
    * Training as MCTformer's main.py: AdamW, lr 5e-4 × batch/512, weight decay 0.05, cosine after 5 warm-up
      epochs, timm RandAugment ``rand-m9-mstd0.5-inc1``, colour jitter 0.4, random erasing 0.25, input 224; the
      last epoch's weights are kept (run.sh generates the maps from checkpoint.pth). ``train.optimizer=adam
      train.lr_base_batch=null train.weight_decay=0`` is the paper's literal reading.
    * Map generation as MCTformer's: ReLU on the correlation map before the product with A_c2p (M, V2's map;
      Eq. 10 has none); A_c2p head-averaged and summed over the last 3 layers, A_p2p over all layers (M);
      every image at its own size, scales (1.0, 0.75, 1.25) + flips summed before the min-max (M), position
      embeddings interpolated as DINO/MCTformer.
    * Ours, where neither says: the CLIP-width → ViT-width map of the text tokens is a learned linear layer
      (``text_proj``; the paper gives no mapping), the averaged output text tokens reach the CLIP width by a
      learned linear ``contrast_proj``, the correlation dot products are divided by √D, the contrastive
      temperature is 0.07 (CLIP's initial value).
    * Optional MCTformer-V2 class head (``model.patch_cam``), so MCTformer-V1/-V2/+ checkpoints load and run
      as ablations: ``text_tokens: false`` + ``class_patch: false`` is MCTformer-V1 ("attention only").

Modules: ``model`` (``MMCSTNet``, masked attention, the maps), ``losses``, ``encoders`` (the ViT and CLIP),
``train`` (optimizer, schedule, transforms, val-mAP selection), ``inference`` (MCTformer's multi-scale
passes), ``loading`` (MCTformer/ViT/MMCST checkpoints), ``method`` (the registered ``MMCST`` Localizer);
configs in ``configs/``, its pretrained models in ``weights.yaml``.

Kept import-free: the registry reads the ``@register_method`` decorator without importing torch (see
:func:`wsolbench.registry.discover_methods`).
"""
