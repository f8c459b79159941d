"""coordinator room."""
