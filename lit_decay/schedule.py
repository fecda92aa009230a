"""Placeholder while the module is being written."""
WeightDecayScheduler = None  # type: ignore
