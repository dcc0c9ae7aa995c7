"""lmforge.predict."""
