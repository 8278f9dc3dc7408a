"""Representation analyses: where the new token sits relative to the words of its meaning."""
