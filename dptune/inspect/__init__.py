"""Inspection: read a study's storage and show it (dashboard, report, export). Never trains."""
