"""The app's screens: sessions (home), new run, run monitor, compare, and modals."""
