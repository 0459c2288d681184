"""Data readers: competition CSVs and images."""
