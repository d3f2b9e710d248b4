"""The EI² job as functions (paper Fig. 2 a-b): load SD and inflate it, tune on one video (Eq. 2), DDIM-invert the
video with the tuned model, render edits with classifier-free guidance. `ei2.train` and `ei2.edit` are thin CLIs
around these.

Latent layouts: the VAE works on frames (n, 4, h, w); the UNet on a video (1, 4, n, h, w).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import importlib.metadata
import platform
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import __version__, ddim
from .config import DEVICES, PRECISIONS
from .errors import Ei2Error
from .text import TextEncoder
from .unet import UNet, VideoOptions, mark_trainable
from .vae import AutoencoderKL
from .weights import check_sd_folder, read_schedule

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """auto, cpu, cuda, cuda:N or mps -> a device this machine has (else a one-line Ei2Error naming the fix)."""
    if not re.fullmatch(DEVICES, name):
        raise Ei2Error(f"device {name!r} is not one of auto, cpu, cuda, cuda:N, mps; e.g. --device cuda:0")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Ei2Error(f"device {name!r} asked for but CUDA is not available; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise Ei2Error(f"device {name!r} asked for but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise Ei2Error(f"device {name!r} asked for but MPS (Apple GPU) is not available here; use --device cpu")
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    """auto: bf16 on a CUDA card that has it, else fp16; fp32 on CPU (CPU half-precision kernels are slow)."""
    if name not in PRECISIONS:
        raise Ei2Error(f"precision {name!r} is not one of {', '.join(PRECISIONS)}; e.g. --precision fp32")
    if name == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return name


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


@dataclass
class Models:
    unet: UNet
    vae: AutoencoderKL
    text: TextEncoder
    device: torch.device
    precision: str
    alphas: torch.Tensor | None = None  # the model's DDIM schedule alpha_t (weights.read_schedule); None: SD v1-4's

    def autocast(self):
        return autocast(self.device, self.precision)


def load_models(model: str, video: VideoOptions, device: torch.device, precision: str) -> Models:
    """SD's text encoder and VAE (frozen) and its UNet inflated with `video` (temporal modules fresh from the global
    random state; ei2.cache.load seeds them from the job's seed alone).

    Under bf16/fp16 the frozen UNet weights are stored in that dtype and only the trainable tensors keep fp32 master
    copies (mark_trainable runs first): the memory of the frozen 860 M parameters halves, results do not change
    because autocast runs those layers in the low dtype anyway."""
    check_sd_folder(model)
    tokenizer = None
    if Path(model).is_file():  # a single CompVis file carries no tokenizer: look beside it
        near = [Path(model).parent / "tokenizer", Path(model).parent / "stable-diffusion-v1-4" / "tokenizer"]
        tokenizer = next((p for p in near if p.is_dir()), None)
    text = TextEncoder.from_pretrained(model, device=device, tokenizer=tokenizer)
    vae = AutoencoderKL.from_pretrained(model)  # fp32: prepare_models casts only the decoder to vae_dtype
    unet = UNet.from_pretrained(model, **dataclasses.asdict(video))
    return prepare_models(unet, vae, text, device, precision, read_schedule(model))


def vae_dtype(precision: str) -> torch.dtype:
    """The VAE decoder's dtype: bf16 for a bf16 job; fp32 otherwise (SD's VAE overflows in fp16). The encoder is
    always fp32 (`prepare_models`)."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def prepare_models(unet: UNet, vae: AutoencoderKL, text, device: torch.device, precision: str,
                   alphas: torch.Tensor | None = None) -> Models:
    """The job's set-up of loaded models: on the device, the VAE frozen with its encoder (and quant_conv) in fp32 and
    its decoder (and post_quant_conv) in `vae_dtype`, the paper's trainable set marked in the UNet, and under bf16/fp16
    its frozen weights stored in that dtype (`freeze_to_dtype_`).

    Why the encoder stays fp32: tuning (Eq. 2) draws every x_0 from the clip's posterior and DDIM inversion starts from
    its mean, so an error there is in every step and in the edits' starting noise; a bf16 decoder only rounds the
    output pixels. The encoder runs once per job, so fp32 costs its 34 M parameters' extra two bytes each (SD v1-4),
    not time. Hand the VAE in fp32 (`load_models` does): a low-precision one is upcast, its rounded weights stay so."""
    vae = vae.to(device, torch.float32).eval().requires_grad_(False)
    for part in (vae.decoder, vae.post_quant_conv):
        part.to(vae_dtype(precision))
    unet = unet.to(device)
    mark_trainable(unet)
    if precision != "fp32":
        freeze_to_dtype_(unet, DTYPES[precision])
    return Models(unet, vae, text, device, precision, alphas)


@torch.no_grad()
def freeze_to_dtype_(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Frozen weights in low precision, fp32 only for the trainable tensors (their own master copies); buffers (the
    spectral-norm u, v) stay fp32. The forward runs under autocast(dtype), which casts the trainable weights for the
    matrix products (a differentiable cast: gradients and AdamW states stay fp32) and runs the norms in fp32. Halves the
    frozen 860 M parameters' memory and removes autocast's per-step weight casts."""
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)
    return model


def make_optimizer(unet: UNet, learning_rate: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable tensors (paper: lr 3e-5; Tune-A-Video: weight decay 1e-2); the fused kernel on CUDA
    (one launch for all 600 trainable tensors instead of several per tensor)."""
    params = [p for p in unet.parameters() if p.requires_grad]
    fused = {"fused": True} if params and params[0].device.type == "cuda" else {}
    return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay, **fused)


@torch.no_grad()
def encode_video(models: Models, frames: torch.Tensor):
    """frames (n, 3, H, W) in [-1, 1] -> the VAE posterior over the frames' latents, computed once (its moments are
    reused by every tuning step, which draws a fresh sample). Four frames at a time, as `decode`; in the encoder's
    dtype, fp32 in every job (`prepare_models`), outside autocast."""
    return models.vae.encode(frames.to(models.device), chunk=4)


def to_video(latents: torch.Tensor) -> torch.Tensor:
    """(n, 4, h, w) frame latents -> (1, 4, n, h, w) video latent."""
    return latents.transpose(0, 1)[None]


def to_frames(latent: torch.Tensor) -> torch.Tensor:
    """(1, 4, n, h, w) video latent -> (n, 4, h, w) frame latents."""
    return latent[0].transpose(0, 1)


MAX_SKIPS = 10  # non-finite gradients this many steps in a row stop the run


class NonFiniteLoss(Exception):
    def __init__(self, step: int):
        super().__init__(f"non-finite loss at step {step}")
        self.step = step


class Stopped(Exception):
    """`tune_steps` stopped on request (`should_stop`) after `step` steps, its losses handed to `on_sync` first."""

    def __init__(self, step: int):
        super().__init__(f"stopped after step {step}")
        self.step = step


class NonFiniteGradients(NonFiniteLoss):
    """MAX_SKIPS steps in a row, first..step (1-based), had a non-finite gradient norm; each was skipped."""

    def __init__(self, step: int, first: int):
        Exception.__init__(self, f"non-finite gradients at steps {first}..{step}")
        self.step, self.first = step, first


def step_unless_skipped(optimizer, ok: torch.Tensor) -> None:
    """`optimizer.step()` where the 0-d bool tensor `ok` holds; where it does not, nothing changes: parameters, AdamW
    moments and AdamW's step count stay bit for bit (weight decay, which acts even on a zero gradient, included).

    A fused optimizer (make_optimizer's on CUDA) is told on the device, as GradScaler tells it: its `found_inf` makes
    the kernel leave parameters and moments and undo the step count; no host synchronization. Zeroing the gradient
    instead would not skip: AdamW would still decay the weights and move the moments. Any other optimizer is asked on
    the host (`bool(ok)`): a synchronization per step on a GPU, none on the CPU where it runs."""
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.found_inf = (~ok).float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif bool(ok):
        optimizer.step()


def skip_streak(skipped: list[int], step: int) -> int:
    """How many steps in a row up to `step` (1-based) are in `skipped`."""
    done = set(skipped)
    n = 0
    while step - n in done:
        n += 1
    return n


def tune_steps(models: Models, posterior, context: torch.Tensor, optimizer, generator: torch.Generator,
               start: int, steps: int, grad_clip: float, scaler=None, sync_every: int = 10, on_sync=None,
               progress: bool = True, skipped: list[int] | None = None, should_stop=None):
    """Steps start..steps-1 of one-shot tuning (Eq. 2): x_0 = a fresh posterior sample of the clip (scaled), t uniform
    in [0, 1000), x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps, loss = ||eps - eps_theta(x_t, t, caption)||^2.

    Losses stay on the device and are read every `sync_every` steps (no per-step host synchronization); then
    `on_sync(step, losses)` is called (checkpointing), after checking they are finite (else NonFiniteLoss).

    A step whose gradient norm (clip_grad_norm_'s total, before clipping) is not finite is skipped, decided on the
    device (`step_unless_skipped`): in bf16 or fp32 nothing else would keep a finite loss's inf/NaN gradient out of the
    weights (fp16's GradScaler skips such a step itself; it is counted the same way). A skipped step still counts:
    its noise and timestep are drawn, the step total and the checkpoints' step advance. The skips are read with the
    losses and appended, 1-based, to `skipped` (the caller's list: pass a resumed run's to continue its count);
    MAX_SKIPS in a row raise NonFiniteGradients at that read, before `on_sync`.

    `should_stop()` (optional) is asked after every step: when true, the window is read and handed to `on_sync` at
    once and `Stopped(step)` is raised (the caller writes its resumable state)."""
    unet, device = models.unet, models.device
    params = [p for p in unet.parameters() if p.requires_grad]
    scale = models.vae.config.scaling_factor
    alphas = (ddim.alphas_cumprod() if models.alphas is None else models.alphas).to(device)
    skipped = [] if skipped is None else skipped
    streak = skip_streak(skipped, start)
    pending: list[torch.Tensor] = []
    unet.train()
    bar = tqdm(range(start, steps), desc="tuning", initial=start, total=steps, disable=not progress)
    for step in bar:
        x0 = to_video(posterior.sample(generator).float() * scale)
        noise = torch.randn(x0.shape, generator=generator, device=device)
        t = torch.randint(0, len(alphas), (1,), generator=generator, device=device)
        xt = ddim.add_noise(x0, noise, t, alphas)
        with models.autocast():
            pred = unet(xt, t, context)
        loss = F.mse_loss(pred.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        ok = torch.isfinite(torch.nn.utils.clip_grad_norm_(params, grad_clip))
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            step_unless_skipped(optimizer, ok)
        pending.append(torch.stack([loss.detach().float(), (~ok).float()]))
        stop = should_stop is not None and step < steps - 1 and should_stop()
        if len(pending) == sync_every or step == steps - 1 or stop:
            window = torch.stack(pending).tolist()  # the one host synchronization per window
            pending.clear()
            first = step - len(window) + 2  # 1-based, as the progress bar counts
            bad = [i for i, (v, _) in enumerate(window) if not torch.isfinite(torch.tensor(v))]
            if bad:
                raise NonFiniteLoss(first + bad[0])
            for i, (_, skip) in enumerate(window):
                streak = streak + 1 if skip else 0
                if skip:
                    skipped.append(first + i)
                if streak == MAX_SKIPS:
                    raise NonFiniteGradients(first + i, first + i - MAX_SKIPS + 1)
            values = [v for v, _ in window]
            bar.set_postfix(loss=f"{sum(values) / len(values):.4f}", **({"skipped": len(skipped)} if skipped else {}))
            if on_sync is not None:
                on_sync(step + 1, values)
            if stop:
                unet.eval()
                raise Stopped(step + 1)
    unet.eval()


def all_finite(tensors) -> bool:
    """Whether every element of `tensors` is finite (one host read); checked before tuned weights are written."""
    tensors = list(tensors)
    return not tensors or bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


@torch.no_grad()
def invert(models: Models, posterior, num_steps: int, progress: bool = True, prompt: str = "") -> torch.Tensor:
    """DDIM inversion of the clip with the tuned UNet, no guidance: x_0 -> x_T. The paper does not say with which
    prompt; Tune-A-Video inverts with the empty one (the default), `prompt` = the clip's caption is config
    `inversion_prompt: caption`.

    x_0 is the posterior mean (Tune-A-Video draws a sample; the mean makes the inversion deterministic)."""
    x0 = to_video(posterior.mean.float() * models.vae.config.scaling_factor)
    context = models.text.encode([prompt])
    with models.autocast():
        return ddim.invert(models.unet, x0, context, num_steps=num_steps, progress=progress,
                           alphas=models.alphas).float()


@torch.no_grad()
def render(models: Models, x_T: torch.Tensor, prompt: str, guidance: float, num_steps: int,
           progress: bool = True) -> torch.Tensor:
    """One edit: guided DDIM sampling from the inverted latent with the edit prompt -> frames (n, 3, H, W) in [-1, 1]."""
    context = models.text.encode([prompt])
    uncond = models.text.encode([""])
    with models.autocast():
        latent = ddim.sample(models.unet, x_T.to(models.device), context, uncond_context=uncond, num_steps=num_steps,
                             guidance=guidance, progress=progress, alphas=models.alphas)
    return decode(models, to_frames(latent.float()))


@torch.no_grad()
def decode(models: Models, latents: torch.Tensor, chunk: int = 4) -> torch.Tensor:
    """(n, 4, h, w) scaled latents -> (n, 3, H, W) images in [-1, 1], a few frames at a time (VAE memory)."""
    out = [models.vae.decode_latents(latents[i:i + chunk]).float().clamp(-1, 1) for i in range(0, len(latents), chunk)]
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------------------------------
# Measurement: one meter for train, the mini benchmark and benchmarks/bench


def versions(device: torch.device) -> dict:
    info = {"ei2": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": importlib.metadata.version("transformers"), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _proc_status_bytes(key: str) -> int | None:
    """A `kB` line of /proc/self/status (VmRSS, VmHWM) in bytes; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{key}:\s+(\d+)\s+kB", f.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current resident set (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    """Give the C heap's free pages back to the OS (glibc), so the resident set tracks live memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class Phase:
    """Wall time and peak memory of the code inside `with`.

    seconds: wall time (CUDA synchronized at both ends). peak_bytes: the absolute high-water mark during the phase;
    increase_bytes: that peak over the memory in use at the start (`peak_gib`, `increase_gib`, `*_mib` the same in
    GiB/MiB; None where not measurable). CUDA: allocated bytes (max_memory_allocated after reset_peak_memory_stats:
    weights, activations, optimizer states, not the allocator's cache). CPU: the process's resident set, VmHWM reset
    through /proc/self/clear_refs, else VmRSS sampled every 5 ms. Garbage is collected and free memory (CUDA cache,
    C heap) returned first, so the start reflects live memory. memory=False times only (for a phase nested in a
    measured one: resetting the peak would cut the outer measurement)."""

    def __init__(self, device: torch.device, memory: bool = True):
        self.device, self.memory = torch.device(device), memory
        self.seconds: float | None = None
        self.start_bytes: int | None = None
        self.peak_bytes: int | None = None
        self._hwm = False
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._read_rss()

    def _read_rss(self) -> None:
        rss = _proc_status_bytes("VmRSS")
        if rss is not None:
            self.peak_bytes = max(self.peak_bytes or 0, rss)

    def __enter__(self):
        if self.memory:
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(self.device)
                self.start_bytes = torch.cuda.memory_allocated(self.device)
            else:
                _malloc_trim()
                self._hwm = _reset_peak_rss()
                self.start_bytes = self.peak_bytes = _proc_status_bytes("VmRSS")
                if not self._hwm and self.start_bytes is not None:
                    self._thread = threading.Thread(target=self._sample, daemon=True)
                    self._thread.start()
        self._sync()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self._sync()
        self.seconds = time.perf_counter() - self._t0
        if not self.memory:
            return False
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        elif self._hwm:
            self.peak_bytes = _proc_status_bytes("VmHWM")
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._read_rss()
        return False

    @property
    def increase_bytes(self) -> int | None:
        if self.peak_bytes is None or self.start_bytes is None:
            return None
        return max(0, self.peak_bytes - self.start_bytes)

    peak_gib = property(lambda self: _scaled(self.peak_bytes, 2**30))
    increase_gib = property(lambda self: _scaled(self.increase_bytes, 2**30))
    peak_mib = property(lambda self: _scaled(self.peak_bytes, 2**20))
    increase_mib = property(lambda self: _scaled(self.increase_bytes, 2**20))


def _scaled(n: int | None, unit: int) -> float | None:
    return None if n is None else n / unit
