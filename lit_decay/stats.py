"""Placeholder while the module is being written."""
group_stats = None  # type: ignore
