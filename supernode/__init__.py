"""SuperNode role: launch configuration for each training host."""
