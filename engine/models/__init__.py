"""Models: family adapters, loading (hub, folder, GGUF, embedded), saving and sizes."""
