"""One loaded model set kept between jobs (`ei2.suite`'s ranks, the web app): loading Stable Diffusion takes longer
than a short job, so a process that runs many jobs loads it once per model, module options, precision and device.

`ModelCache.models(cfg)` hands the set back in exactly the state a fresh load gives (`load`): the trainable tensors
(W_Q of FFAM and cross-attention) reset to the base model's weights, the temporal modules re-initialised from
cfg.seed alone (`init_temporal_`: a dedicated random state, so what ran before does not matter), no gradients, the
UNet in training mode as built; a job tuned on a reused set therefore gives the same weights, bit for bit, as a job
run alone. A different key (model path, module options, precision, device, compile) drops the set and loads anew:
one set in memory.
"""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

import torch

from .attention import temporal_module
from .config import load_config, video_options
from .errors import Ei2Error
from .pipeline import Models, load_models, resolve_device, resolve_precision
from .tuned import load_tuned
from .unet import UNet, is_temporal_key


@torch.no_grad()
def init_temporal_(unet: UNet, seed: int) -> UNet:
    """Give every temporal module (STAM / TA: norm_temp, attn_temp, spectral-norm u, v included) the initial weights
    that `seed` alone determines: the modules are built again, in the UNet's block order, from a CPU random state
    seeded with `seed` (forked: the caller's random state is untouched) and copied in, cast to the dtype and device
    each tensor has. So a job's starting point does not depend on what ran before in the process (another job, another
    model loaded first) or on which GPU runs it; a fresh load and a reused model (ei2.cache) start from the same
    weights, bit for bit."""
    video = unet.video
    if video.temporal == "none":
        return unet
    blocks = [m for m in unet.modules() if getattr(m, "attn_temp", None) is not None]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for block in blocks:
            dim = block.attn_temp.to_q.in_features
            fresh = temporal_module(video.temporal, dim, block.attn_temp.heads, video.temporal_norm,
                                    video.spectral_norm)
            for own, new in zip((block.norm_temp, block.attn_temp), fresh):
                state = new.state_dict()
                for key, tensor in own.state_dict().items():
                    tensor.copy_(state[key].to(tensor.dtype))
    return unet


def job_settings(cfg, models: Models) -> Models:
    """The per-job settings of a loaded set that change no weight: the UNet's memory options."""
    models.unet.gradient_checkpointing = cfg.gradient_checkpointing
    models.unet.recompute_activations = cfg.recompute_activations
    return models


def load(cfg, device: torch.device, precision: str) -> Models:
    """A fresh set for a job: SD inflated with the config's modules, temporal modules from cfg.seed, the memory
    options set, compiled in place with `compile` (names, checkpoints and hooks stay those of the plain module)."""
    models = load_models(cfg.model, video_options(cfg), device, precision)
    init_temporal_(models.unet, cfg.seed)
    if cfg.compile:
        models.unet.compile()
    return job_settings(cfg, models)


class ModelCache:
    """Keeps one loaded set (`Models`) and what it was loaded for; `models(cfg)` reuses it when the key matches."""

    def __init__(self):
        self.key: tuple | None = None
        self._models: Models | None = None
        self._base: dict[str, torch.Tensor] = {}  # the base weights of the trainable non-temporal tensors (CPU)
        self.loads = 0  # how many sets were loaded (the suite logs reuse; tests count it)

    @staticmethod
    def key_of(cfg, device: torch.device, precision: str) -> tuple:
        return (str(Path(cfg.model).resolve()), dataclasses.astuple(video_options(cfg)), precision, str(device),
                bool(cfg.compile))

    def models(self, cfg, device: str | torch.device | None = None, precision: str | None = None) -> Models:
        """The set for `cfg` (device and precision: the config's unless given), as a fresh `load` would give it."""
        dev = resolve_device(str(device or cfg.device))
        prec = resolve_precision(precision or cfg.precision, dev)
        key = self.key_of(cfg, dev, prec)
        if key != self.key or self._models is None:
            self.drop()
            self._models = load(cfg, dev, prec)
            self._base = {k: p.detach().to("cpu", copy=True) for k, p in self._models.unet.named_parameters()
                          if p.requires_grad and not is_temporal_key(k)}
            self.key = key
            self.loads += 1
            return self._models
        return self.reset(cfg)

    @torch.no_grad()
    def reset(self, cfg) -> Models:
        """Bring the kept set back to its freshly loaded state for a job with `cfg` (same key)."""
        models = self._models
        unet = models.unet
        params = dict(unet.named_parameters())
        for k, base in self._base.items():
            params[k].copy_(base)
        init_temporal_(unet, cfg.seed)
        for p in unet.parameters():
            p.grad = None
        unet.train()  # as built; tune_steps switches to eval at its end
        return job_settings(cfg, models)

    def models_for_run(self, run_dir, device: str | None = None, precision: str | None = None) -> Models:
        """The base set of a finished run (its config.yaml) with the run's tuned tensors loaded, in eval mode: for
        rendering new edits without loading the base model again."""
        run_dir = Path(run_dir)
        if not (run_dir / "config.yaml").is_file():
            raise Ei2Error(f"{run_dir} holds no config.yaml; give the output_dir of a finished ei2.train run")
        cfg = load_config(run_dir / "config.yaml")
        models = self.models(cfg, device, precision)
        load_tuned(models.unet, run_dir / "tuned.safetensors")
        models.unet.eval()
        return models

    def drop(self) -> None:
        """Forget the kept set and give its memory back."""
        self._models, self._base, self.key = None, {}, None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
