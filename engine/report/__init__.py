"""Reports on query results: a self-contained HTML page (no network assets)."""

from engine.report.html import load_results, render_html_report, write_html_report

__all__ = ["load_results", "render_html_report", "write_html_report"]
