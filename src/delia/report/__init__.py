"""Reports: markdown and JSON tables of a run."""
