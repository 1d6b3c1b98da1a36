"""Merge plans (mergekit YAML), merge methods and the streaming executor (issue 4)."""
