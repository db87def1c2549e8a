"""Evaluation: benchmark data loading (shared with the contamination check), and later the harness."""
