"""detrex layer: cross-stage label assignment (CSLA) criteria for detrex detectors."""
