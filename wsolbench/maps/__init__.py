"""Map extractors shared by more than one method, or general enough to be (each module names its users).

- ``gradcam``: layer-agnostic Grad-CAM on forward hooks. Users: CAM (``cam.gradcam`` maps), TeD-Loc (via
  ``clip_gradcam``).
- ``clip_gradcam``: CLIP-ES Grad-CAM on an open_clip ViT. Users: TeD-Loc's pseudo-labels.
- ``clip_relevancy``: Chefer et al.'s CLIP relevancy maps. Users: WWbL (the L_rmap target and its baseline).
- ``cross_attention``: cross-attention recording through diffusers' processor interface. Users: GenPromp.
- ``proposals``: selective search, grid boxes and the area filter. Users: WWbL's open-world mode.
- ``clustering``: sentence-transformers-style community detection. Users: WWbL's open-world mode.

Method-specific code lives in ``wsolbench.methods.<name>``; these modules import no method.
"""
