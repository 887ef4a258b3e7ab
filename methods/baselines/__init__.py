"""The reference localizers `center` and `random`: `wsolbench.methods.baselines.method`.

Kept import-free: the registry reads the `@register_method` decorator without importing torch (see
:func:`wsolbench.registry.discover_methods`); the code is in the modules beside this file.
"""
