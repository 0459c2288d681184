"""museum: tell the typology of a museum item from its photo, its description, or both."""

__version__ = "0.1.0"
