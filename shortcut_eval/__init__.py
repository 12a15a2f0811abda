"""The eval harness: practice curves, quality guards and peers on real data (``shortcut-eval``)."""
