"""Data and evaluation: text and image sources, model inputs, metrics, lm-eval tasks, seeded synthetic models."""
