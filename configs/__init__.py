"""Default YAML configs: one per method (paper defaults) and per (method, dataset) where they differ."""
