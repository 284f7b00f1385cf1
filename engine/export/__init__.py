"""Exporting a run's model as a servable Hugging Face folder: plan (what, where, the checks, the push; light,
run by `tas export` and the panel), card (the model card; light) and merge (loads, merges and saves the weights;
heavy, run as `python -m engine.export.merge` in a process of its own)."""
