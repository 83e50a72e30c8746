"""Statistics on calibration scores: conformal thresholds and p-values, selective risk, drift."""
