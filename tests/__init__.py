"""fedsynth test suite."""
