"""Development-only helpers of `python -m ei2.bench` that live outside the `ei2` package (not installed with it)."""
