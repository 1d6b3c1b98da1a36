"""Task-vector statistics: streaming norms, sign conflicts, cosines and compatibility checks (issue 3)."""
