"""Helpers shared by several test modules (stand-in models, tiny corpora, live servers); no tests here."""
