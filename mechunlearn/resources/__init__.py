"""Text that mechunlearn ships as package data (read with :mod:`importlib.resources`).

See ``README.md`` in this folder for what each file is and where it came from.
"""
