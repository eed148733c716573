"""Evaluation of predicted label volumes against references: metrics, summaries, comparisons and reports.

Submodules (import them directly; this package imports nothing heavy):

- :mod:`pipeline.evaluate.metrics`: per-case, per-class metrics computed with MONAI (``case_metrics``).
- :mod:`pipeline.evaluate.summary`: statistics over cases and paired run comparison (``summarise``,
  ``compare_runs``).
- :mod:`pipeline.evaluate.report`: ``metrics.csv``, ``summary.json``, the self-contained
  ``evaluation.html``, overlay thumbnails and the printed table.
- :mod:`pipeline.evaluate.grids`: the same-grid check between a prediction and its reference.
"""
