"""Evaluation as a table of probes (format, translation, controls, leakage, drift) and the scorers they use."""
