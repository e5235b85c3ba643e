"""Measuring quality and cost."""
