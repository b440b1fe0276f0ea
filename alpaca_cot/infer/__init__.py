"""Inference on a saved run: loading base model + adapter, generation, batch prediction, scoring, merging.

Everything that reads a finished run folder back; the serving and evaluation stages build on it.
"""
