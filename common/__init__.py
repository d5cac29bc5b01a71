"""What every component's settings share: the pydantic base of a config section, the per-role
resource request and the sampler settings. Imports nothing of the project but ``algo``."""
