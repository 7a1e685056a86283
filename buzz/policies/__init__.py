"""The BUZZ policy family (registered on import)."""
