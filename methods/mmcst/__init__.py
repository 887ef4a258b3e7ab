"""MMCST (Xu et al., CVPR 2023) on MCTformer: `wsolbench.methods.mmcst.method`; configs in configs/.

Kept import-free: the registry reads the `@register_method` decorator without importing torch (see
:func:`wsolbench.registry.discover_methods`); the code is in the modules beside this file.
"""
