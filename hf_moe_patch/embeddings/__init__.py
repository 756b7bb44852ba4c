"""MoE embeddings (MoEE) with any routing, and their mteb evaluation."""
