"""Development tools outside the `ei2` package (not installed with it), run from the repository root:
`python -m benchmarks.bench` (speed and memory next to diffusers), `python -m benchmarks.saved_activations`,
`python -m benchmarks.ic_precision`. Here diffusers may be imported (benchmarks/diffusers_reference.py); ei2 never
does."""
