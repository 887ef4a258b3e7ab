"""CAM (Zhou et al., CVPR 2016), the WSOL baseline: `wsolbench.methods.cam.method`; recipes in configs/.

Kept import-free: the registry reads the `@register_method` decorator without importing torch (see
:func:`wsolbench.registry.discover_methods`); the code is in the modules beside this file.
"""
