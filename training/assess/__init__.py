"""Assessing a trained run: scores, metrics, calibration, evaluation, comparison and the report."""
