"""Weight reconstruction after calibration (AdaRound)."""
