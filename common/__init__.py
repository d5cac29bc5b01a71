"""What every component's settings share: the pydantic base of a config section and the
per-role resource request. Imports nothing of the project (the bottom of the import order
with ``algo``)."""
