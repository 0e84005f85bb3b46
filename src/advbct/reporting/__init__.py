"""Tables and reports."""

from advbct.reporting.tables import comparison_table, print_report, report_table

__all__ = ["comparison_table", "print_report", "report_table"]
