"""A toy wsolbench method package: what README's "Adding a method" asks for, used by the plugin tests."""
