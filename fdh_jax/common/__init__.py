"""Small helpers shared by every package: atomic file writes, checksums and variable
fingerprints, lazily imported package attributes, the L2 normalisation of model and losses."""
