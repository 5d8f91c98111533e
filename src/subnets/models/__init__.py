"""Encoders, head gates, the parser and tagger, MST decoding, and building them from config."""
