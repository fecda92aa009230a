"""Placeholder while the module is being written."""
GroupingReport = explain = param_groups = None  # type: ignore
