"""Skills folders: saving, loading, checking, merging and summarising what a handle learned."""
