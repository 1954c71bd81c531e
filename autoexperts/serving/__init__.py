"""`autoexperts serve`: Transformers' own server (`transformers serve`) with `"auto"` as the experts implementation of
every model it loads without an explicit one, each optionally tuned on a warm-up file before its first request.

- `warmup`: the warm-up file of `--tune-on` (read with the standard library only) and running it under `tune`;
- `experts_default`: `auto_by_default()`, the one hook into Transformers' model construction;
- `loaders`: Transformers' serve model loader, subclassed to load through that hook and tune;
- `command`: runs Transformers' serve command in this process with that loader in place.

This package's `__init__` imports nothing, so that the command's argument errors load no torch.
"""
