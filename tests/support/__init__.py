"""Helpers shared by the tests (peers, databases, free ports)."""
