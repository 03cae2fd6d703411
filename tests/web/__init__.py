"""The operators\x27 console: unit tests, and a real browser against real services."""
