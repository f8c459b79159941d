"""studies room."""
