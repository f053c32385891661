"""The recipe and the pass manager: the recipe schema, the pass contract and scheduler, the artifact kinds."""
