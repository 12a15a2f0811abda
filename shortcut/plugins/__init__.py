"""Architecture plugins: one small module per model family.

Each module registers an :class:`shortcut.arch.ArchSpec` when imported; shortcut
imports every module here the first time it resolves a model.
"""
