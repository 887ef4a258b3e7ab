"""WWbL, What is Where by Looking (Shaharabany et al., NeurIPS 2022): `wsolbench.methods.wwbl.method`.

Kept import-free: the registry reads the `@register_method` decorator without importing torch (see
:func:`wsolbench.registry.discover_methods`); the code is in the modules beside this file.
"""
