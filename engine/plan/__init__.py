"""The memory plan: each stage's predicted peak GPU memory, from the config and the models' config.json.

Light (stdlib, pydantic, huggingface_hub for a config.json): `tas plan` and the panel's start confirmation
use it, so a stage that will not fit is named before it starts, not an hour into it with an OOM.
"""
