"""Model structure: tracing blocks into FX graphs, linear roles, attention capture, 2:4 storage, model classes."""
