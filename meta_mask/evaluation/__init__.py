"""Metrics (EM/F1, accuracy, ROUGE, overlap buckets) and reports (tables, plots, heatmaps)."""
