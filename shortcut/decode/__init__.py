"""Decoding with a handle: the hooked layer forward, lossless draft and verify, fast mode, and what they cost."""
