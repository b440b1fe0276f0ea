"""Training: a run resolved into a plan, then model, trainer, checkpoints and the saved run folder.

Owns the recipe's phases, the Trainer pieces (loss, attention over packed rows, callbacks, resumable
checkpoints) and the multi-process setup; reads the registries and the data stage, never the scripts.
"""
