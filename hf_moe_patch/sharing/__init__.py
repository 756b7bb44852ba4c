"""Sharing patched models: saving, loading and pushing with the routing, and self-contained remote code."""
