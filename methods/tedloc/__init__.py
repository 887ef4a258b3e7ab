"""TeD-Loc (Murtaza et al., arXiv 2501.12632): `wsolbench.methods.tedloc.method`; configs in configs/.

Kept import-free: the registry reads the `@register_method` decorator without importing torch (see
:func:`wsolbench.registry.discover_methods`); the code is in the modules beside this file.
"""
