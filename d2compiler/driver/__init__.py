"""The jobs the command line runs: compress (run), plan, export, and the multi-process launcher."""
