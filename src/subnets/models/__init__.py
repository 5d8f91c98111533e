"""Encoders, their layouts and unit gates, the parser and tagger, MST decoding, and building them from config."""
