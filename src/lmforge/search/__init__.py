"""lmforge.search."""
