"""The model: scopes, value validation, declared options, and the writes the tasks make."""
