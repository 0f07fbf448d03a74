"""The compile core: the config, the context passes share, pipelines and recipes, the pass cache, reproducible builds and the report."""
