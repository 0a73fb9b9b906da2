"""Pure tensor math used by the ops: selection, sparsification, sign election, DPPA statistics.

Nothing here knows about recipes, steps or files: each function takes tensors and numbers and
returns tensors and numbers, so it can be tested against a direct implementation.
"""
