"""Placeholder while the module is being written."""
WeightDecayMonitor = None  # type: ignore
