"""Signatures: the keys of a fleet, and what a write task's signature covers."""
