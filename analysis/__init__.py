"""Task-vector statistics: one streaming pass over a base and its fine-tunes.

``run_analysis(base, models)`` returns the ``mergescope.analysis/1`` report; ``stream_analysis`` yields
per-tensor results, warnings and progress as the pass runs (the TUI's API).
"""

from .compatibility import AnalysisWarning
from .report import SCHEMA, AnalysisCancelled, ReportBuilder, run_analysis, unique_names
from .stream import Progress, TensorResult, stream_analysis
from .sums import SignCounts, TaskVectorSums

__all__ = [
    "SCHEMA",
    "AnalysisCancelled",
    "AnalysisWarning",
    "Progress",
    "ReportBuilder",
    "SignCounts",
    "TaskVectorSums",
    "TensorResult",
    "run_analysis",
    "stream_analysis",
    "unique_names",
]
