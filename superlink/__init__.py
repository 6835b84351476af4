"""SuperLink role: launch configuration for the host that runs the SuperLink (and its ServerApps)."""
