"""The config: schema (every key), load (file → TASConfig, errors with key and line), references (`${}`),
edit (the panel's in-place edits), prompts (prompt ids and prompt.yaml). Light: stdlib, PyYAML, pydantic."""
