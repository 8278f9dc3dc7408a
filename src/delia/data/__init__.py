"""Data stages: task rows, diverse (self-sampled) rows, mixing."""
