"""Evaluation: formatted-text accuracy and label accuracy."""
