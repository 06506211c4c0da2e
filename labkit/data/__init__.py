"""Data files shipped with labkit (see README.md here). Read them with ``labkit.text.load_corpus``."""
