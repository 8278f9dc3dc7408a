"""Model and token handling: loading, new special tokens, generation."""
