"""The reference side of `python -m benchmarks.bench`: diffusers' UNet2DConditionModel, the numerical oracle of the
tests and the speed reference of the benchmark. Kept outside the `ei2` package so that ei2 itself never imports
diffusers."""

from __future__ import annotations


def version() -> str | None:
    """diffusers' version, or None when it cannot be imported (then the bench's reference columns read n/a)."""
    try:
        import diffusers
    except ImportError:
        return None
    diffusers.utils.logging.set_verbosity_error()  # its advice on .to(dtype) is about loading, not the benchmark
    return diffusers.__version__


def unet(config):
    """diffusers' UNet2DConditionModel with the architecture of an ei2 UNetConfig (default init, CPU, fp32)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**{k: v for k, v in config.to_diffusers_dict().items() if not k.startswith("_")})
