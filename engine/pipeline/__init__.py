"""The pipeline: its stages by name and order (stages), and its models (models).

Light: names, labels and config keys only; nothing here imports a stage or a model."""
