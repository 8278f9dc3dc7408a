"""Model and token handling: loading, new special tokens, generation backends, an arm's model and generator."""
