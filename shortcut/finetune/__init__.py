"""Offline consolidation of practised skills: the ``shortcut-finetune`` command."""
