"""CSV export: each consumed workflow's data as a CSV file, `{uuid}.csv`, in a directory.

`render`: the CSV of a JSON document (the format, docs/csv.md). `files`: a file put in
place whole and at once (unnamed files opened ahead, atomic renames, the filesystem's
flush). `fsync`: a file's fsync off the event loop. `exporter`: `CsvExporter`, the
`Exporter` port over those, with the flush behind the consumes and the recovery after a
crash.
"""

from workflows.adapters.csv_export.exporter import LATE_AFTER, MARKER, MTIME_SLACK, CsvExporter

__all__ = ["LATE_AFTER", "MARKER", "MTIME_SLACK", "CsvExporter"]
