"""medfocus.report: matplotlib figures and the self-contained HTML report of a run."""

from medfocus.report.html import build_report, medfocus_view, results_table, summarize

__all__ = ["build_report", "medfocus_view", "results_table", "summarize"]
