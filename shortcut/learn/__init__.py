"""Learning while used: practice from full-path forwards, and practised sequences."""
