"""Widgets of the layer screen."""
