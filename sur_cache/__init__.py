"""sur-cache: cache the frozen models' features once, then train SUR-adapters from the cache."""

__version__ = "0.1.0"
