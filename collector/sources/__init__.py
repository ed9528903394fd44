"""One module per source of numbers; each registers itself (collector/registry.py)
and every module here is loaded (`load_sources`): adding a source is adding a file."""
