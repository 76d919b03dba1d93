"""Scores and the report: retrieval metrics, one checkpoint's evaluation, attribution against the control, report.json/md/html and plots."""
