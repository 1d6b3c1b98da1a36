"""Widgets of the run screen."""
