"""Data stages: task rows, diverse (self-sampled) rows, mixing, and the baseline arms' rows and prompts."""
