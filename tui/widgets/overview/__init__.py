"""Widgets of the overview screen."""
