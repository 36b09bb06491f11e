"""Deep-COVID Screen: the shared core (networks, decoding, preprocessing, bundles, scoring, storage)."""

__version__ = "0.1.0"
