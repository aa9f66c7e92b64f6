"""citycard: a city's citizen / social security card platform."""

__version__ = "0.1.0"
