"""Merge plans (mergekit YAML), merge methods and the streaming executor."""
