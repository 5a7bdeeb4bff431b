"""Everything the Chalice app needs at run time, one concern per module.

See ``../shared/DESIGN.md`` for the map. ``app.py`` imports from here; nothing
here imports ``app``.
"""
