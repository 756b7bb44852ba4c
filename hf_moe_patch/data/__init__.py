"""Data the project makes or ships: WordNet 3.0, the local mteb tasks built from it, and seeded text corruption."""
