"""The app's widgets, grouped by the screen area they belong to."""
