"""A trained model leaves kdcli here: export formats (a new one goes in formats.py), checks, quantization, latency."""
