"""The reference side of `python -m benchmarks.bench`: diffusers' UNet2DConditionModel, the numerical oracle of the
tests and the speed reference of the benchmark. Kept outside the `ei2` package so that ei2 itself never imports
diffusers; without diffusers the bench still runs and its reference columns read n/a."""

from __future__ import annotations

try:
    import diffusers
except ImportError:  # not installed (the `test` extra brings it)
    diffusers = None
else:
    diffusers.utils.logging.set_verbosity_error()  # its advice on .to(dtype) is about loading, not the benchmark


def version() -> str | None:
    """diffusers' version, or None when it cannot be imported (then the bench's reference columns read n/a)."""
    return diffusers.__version__ if diffusers is not None else None


def unet(config):
    """diffusers' UNet2DConditionModel with the architecture of an ei2 UNetConfig (default init, CPU, fp32)."""
    return diffusers.UNet2DConditionModel(**{k: v for k, v in config.to_diffusers_dict().items()
                                             if not k.startswith("_")})
