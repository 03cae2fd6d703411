"""Redis: the shared cache (its scripts in ``*.lua``, registered once) and the processes'
reports."""
