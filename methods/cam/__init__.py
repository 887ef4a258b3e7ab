"""CAM — Class Activation Mapping (Zhou et al., CVPR 2016), the WSOL baseline, with an optional Grad-CAM variant.

What the paper defines, and this package implements:

* A classification CNN whose last conv features ``f`` (D×h×w) pass global average pooling into one linear
  layer ``W`` (C×D); the class activation map of class c is ``Σ_d W[c, d] · f[d]``, at the feature resolution.
* The backbone keeps a high-resolution last feature map: VGG's layers after conv5_3 (pool5 and the fully
  connected layers) are removed and one 3×3 conv with 1024 channels is added before the pooling (14×14 maps).
* The network is trained for classification only (image labels), then the map of the class is the localization.

Where the official evaluation code (clovaai/wsolevaluation, Choe et al. CVPR 2020, the protocol the paper
numbers here follow) differs from the paper, and what we do:

* Backbones: VGG16 as above (``large_feature_map`` also drops pool4: 28×28), ResNet50 with layer4 (and layer3
  for 28×28) at stride 1, InceptionV3 instead of GoogLeNet (Mixed_6a at stride 1, two 3×3 1024-channel convs with
  dropout). We build the same modules (model.py) and read its checkpoints (loading.py, parity tested against
  its outputs in tests/test_cam_parity.py).
* Its CAM is the channel mean (``1/D``) of the weighted features, plus the classifier bias for InceptionV3 (a
  1×1 conv classifier); ours is the bias-free sum. Both become the same score map after its min-max
  normalisation, which the harness applies.
* InceptionV3 is fed the ImageNet-normalised tensor, not the [-1, 1] range its Google weights were trained on
  (``inception_input: imagenet``; ``pm1`` gives torchvision's rescale).
* Boxes: the paper thresholds the map at 20% of its maximum and boxes the largest connected component;
  wsolevaluation sweeps the threshold (MaxBoxAcc, several IoUs, optionally every contour). The harness's
  ``wsolevaluation`` protocol does the latter.
* Training: SGD, the new layers at ×10 the learning rate (ResNet50: layer4 too), resize 256 + random crop 224 +
  flip, the per-backbone × dataset hyper-parameters of its published commands (configs/cam_<backbone>_<dataset>.yaml,
  each value with its source). VOC/COCO use the IRN recipe (multi-label soft margin; configs/cam_voc.yaml).

Modules: ``method`` (the registered ``CAM`` class), ``model`` (CAMNet and the trunks), ``train`` (loss,
optimizer, schedule, loop), ``loading`` (ImageNet weights through the catalogue, saved CAMs, wsolevaluation
checkpoints), ``recipes`` (the named backbone × dataset configs). Defaults: configs/cam.yaml only.

Kept import-free: the registry reads the ``@register_method`` decorator without importing torch (see
:func:`wsolbench.registry.discover_methods`).
"""
