"""Tooling for building and checking the book (not part of the ``bnlib`` package)."""
