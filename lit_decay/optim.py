"""Placeholder while the module is being written."""
configure_adam = None  # type: ignore
