"""Evaluation of aligned models: generation-based accuracy and reports."""
