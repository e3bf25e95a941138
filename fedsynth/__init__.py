"""fedsynth."""
