"""Large-scene georeferenced inference and vectorization."""
