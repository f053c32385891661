"""Writers for what the executor produced."""
