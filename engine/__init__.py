"""minigpt engine: contextual pruning pipeline, headless and UI-free.

Importing this package is cheap: torch and transformers load only in the modules that
need them (models, calibrate, prune, ...), so the app can read sessions without them.
"""

__version__ = "0.1.0"
