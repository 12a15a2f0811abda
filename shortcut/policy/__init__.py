"""When to exit early: the exit policy, the exit heads, and how the heads are fitted."""
