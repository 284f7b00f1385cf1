"""Evaluations that score what a model writes, as opposed to its loss: HumanEval code execution.

Light package: standard library only (no torch, no transformers), so the panel and the CLI can import it.
"""
