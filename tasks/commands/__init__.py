"""Commands that are not pipeline stages: score, feedback, card, predict, export, approve,
sweep-report.

Each is one module with one entry point, called by reference from ``tasks.cli``, like a
stage's step module; none is a DVC stage, so none is in ``dvc.yaml``.
"""
