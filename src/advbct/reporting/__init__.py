"""Tables and reports."""

from advbct.reporting.tables import print_report, report_table

__all__ = ["print_report", "report_table"]
