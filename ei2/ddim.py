"""DDIM sampling and inversion for Stable Diffusion v1, as small pure functions (k-diffusion style).

Notation follows the DDIM paper (Song et al. 2021, "Denoising Diffusion Implicit Models"): alpha_t there is the
cumulative product of (1 - beta), what diffusers calls `alphas_cumprod`; eps_theta is the model's noise prediction.
The numbers reproduce diffusers' DDIMScheduler with the Stable Diffusion v1-4 scheduler config (scaled_linear betas
0.00085 -> 0.012, 1000 training steps, "leading" spacing with steps_offset 1, set_alpha_to_one False, epsilon
prediction, no clipping); tests/test_ddim.py checks that against diffusers.

The model is always an argument: `model(x, t, context) -> eps`, x a latent of any shape with the batch first (ei2 uses
(b, 4, frames, h, w)), context the text embeddings (b, 77, d). `sample` and `invert` pass t as a 0-d int64 tensor on
the latents' device, which the model broadcasts over the batch. Keeping it a tensor means no host-to-device work
beyond one copy per loop and one compiled graph for every t under torch.compile.

Precision: the alpha table is float32 (float64 for float64 latents) on the latents' device; the update coefficients are
0-d tensors, so the arithmetic on the latents stays in their dtype. The loops index the table with Python ints taken
from a CPU timestep list, so no step waits on the device (no .item()).
"""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm


def alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """alpha_t of the DDIM paper (prod_{s<=t} (1 - beta_s)) for Stable Diffusion's "scaled_linear" schedule.

    betas = linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2. Computed in float32 with the same operations as
    diffusers' DDIMScheduler, so the table is bit-identical to its `alphas_cumprod` (float32, CPU).
    """
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def snr_shifted(alphas: Tensor, shift: float) -> Tensor:
    """The schedule whose signal-to-noise ratio is `shift` times that of `alphas` at every t:
    SNR(t) = a_t / (1 - a_t), SNR'(t) = shift * SNR(t)  =>  a'_t = shift a_t / (1 - a_t + shift a_t).

    Why (issue 13; Hoogeboom et al. 2023, "simple diffusion", Sec. 3.1; Chen 2023, "On the importance of noise
    scheduling"): averaging k x k latent pixels divides the noise's std by k, so at the same t a 64x64 latent (SD at
    512 px) keeps an object's layout at (64/d)^2 times the SNR that a d x d latent does. A small model with SD's
    schedule loses the layout at a t where SD still has it; shift = (64/d)^2 puts both at the same layout SNR."""
    return shift * alphas / (1 - alphas + shift * alphas)


def betas_of(alphas: Tensor) -> Tensor:
    """beta_t = 1 - a_t / a_{t-1} (a_{-1} = 1): the per-step betas whose cumulative product is `alphas`, the form
    diffusers' scheduler_config.json stores a non-standard schedule in (`trained_betas`)."""
    return 1 - alphas / torch.cat([alphas.new_ones(1), alphas[:-1]])


def schedule(config: dict) -> Tensor:
    """alpha_t from a diffusers DDIMScheduler config (a model folder's scheduler/scheduler_config.json), as diffusers
    computes it in float32: `trained_betas` when given, else SD's "scaled_linear" from beta_start and beta_end.
    What the model was trained for must be what ei2 implements (1000 steps, epsilon prediction; ValueError
    otherwise); the sampler's own settings in the file (spacing, offset, final alpha) are not read: `timesteps`,
    `sample` and `invert` always use SD v1's."""
    for key, value in {"num_train_timesteps": 1000, "prediction_type": "epsilon"}.items():
        if config.get(key, value) != value:
            raise ValueError(f"{key} is {config[key]!r}; ei2's DDIM implements SD v1's {value!r}")
    if config.get("trained_betas") is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float32)
        if betas.shape != (1000,):
            raise ValueError(f"trained_betas has {betas.numel()} values, expected 1000")
        return torch.cumprod(1.0 - betas, dim=0)
    if config.get("beta_schedule", "scaled_linear") != "scaled_linear":
        raise ValueError(f"beta_schedule is {config['beta_schedule']!r}; ei2 implements SD's 'scaled_linear' "
                         "(or explicit trained_betas)")
    return alphas_cumprod(1000, config.get("beta_start", 0.00085), config.get("beta_end", 0.012))


def timesteps(num_steps: int, num_train_timesteps: int = 1000, steps_offset: int = 1) -> Tensor:
    """The sampling timesteps, descending, with "leading" spacing (the sub-sequence tau of DDIM section 4.2).

    t_i = i * (T // num_steps) + steps_offset for i = num_steps-1, ..., 0; 50 steps give 981, 961, ..., 1.
    Returns a CPU int64 tensor.
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    ratio = num_train_timesteps // num_steps
    return torch.arange(num_steps - 1, -1, -1, dtype=torch.int64) * ratio + steps_offset


def _alphas_for(x: Tensor, alphas: Tensor | None) -> Tensor:
    """The alpha table on x's device, float32 (or float64 when x is float64)."""
    a = alphas_cumprod() if alphas is None else alphas
    return a.to(device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))


def _at(alphas: Tensor, t) -> Tensor:
    """alphas[t], where a negative t stands for the final alpha alphas[0] (SD's set_alpha_to_one=False).

    t: Python int or int64 tensor; no branching on tensor values, so nothing synchronises with the device.
    """
    if isinstance(t, Tensor):
        return alphas[t.to(alphas.device).clamp(min=0)]
    return alphas[max(int(t), 0)]


def _ddim(x: Tensor, eps: Tensor, a_t: Tensor, a_to: Tensor, sigma: Tensor | float = 0.0) -> Tensor:
    """DDIM Eq. 12 from noise level a_t to a_to, without the random term.

    x_to = sqrt(a_to) * x0_pred + sqrt(1 - a_to - sigma^2) * eps,  x0_pred = (x - sqrt(1 - a_t) * eps) / sqrt(a_t).
    The operations are written in diffusers' order so float32 results agree with it to the last bit or so.
    """
    beta_t = 1 - a_t
    x0 = (x - beta_t**0.5 * eps) / a_t**0.5  # "predicted x_0"
    direction = (1 - a_to - sigma**2) ** 0.5 * eps  # "direction pointing to x_t"
    return a_to**0.5 * x0 + direction


def step(eps: Tensor, t, t_prev, x: Tensor, alphas: Tensor | None = None, eta: float = 0.0,
         generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
    """One DDIM step x_t -> x_{t_prev} (DDIM paper Eq. 12), epsilon prediction, no clipping of predicted x0.

        x_prev = sqrt(a_prev) * (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)      # predicted x_0
                 + sqrt(1 - a_prev - sigma_t^2) * eps                         # direction pointing to x_t
                 + sigma_t * noise                                            # random noise
        sigma_t(eta) = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)   (Eq. 16)

    eta = 0 is deterministic DDIM, eta = 1 is DDPM's ancestral step. a = alphas_cumprod; t_prev < 0 (the last step)
    uses a_prev = alphas_cumprod[0], as SD's set_alpha_to_one=False. t, t_prev: Python ints or int64 tensors.
    `alphas` defaults to `alphas_cumprod()`. `noise` (standard normal, x's shape) overrides `generator` for eta > 0.
    """
    alphas = _alphas_for(x, alphas)
    a_t, a_prev = _at(alphas, t), _at(alphas, t_prev)
    if eta == 0:
        return _ddim(x, eps, a_t, a_prev)
    variance = ((1 - a_prev) / (1 - a_t)) * (1 - a_t / a_prev)
    sigma = eta * variance**0.5
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return _ddim(x, eps, a_t, a_prev, sigma) + sigma * noise


def add_noise(x0: Tensor, noise: Tensor, t, alphas: Tensor | None = None) -> Tensor:
    """The forward process q(x_t | x_0) = N(sqrt(a_t) x_0, (1 - a_t) I) (DDIM Eq. 4; it gives x_t in EI² Eq. 2).

    x_t = sqrt(a_t) * x0 + sqrt(1 - a_t) * noise. t: Python int, 0-d tensor, or a (b,) int64 tensor with one
    timestep per batch element (as in training). Same numbers as diffusers' DDIMScheduler.add_noise.
    """
    alphas = _alphas_for(x0, alphas)
    a = alphas[torch.as_tensor(t, device=alphas.device)]
    if a.dim() == 1:  # one timestep per batch element
        a = a.view(-1, *([1] * (x0.dim() - 1)))
    a = a.to(x0.dtype)
    return a**0.5 * x0 + (1 - a) ** 0.5 * noise


def _eps(model, x: Tensor, t: Tensor, context: Tensor, uncond_context: Tensor | None, guidance: float) -> Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): eps = eps_u + g (eps_c - eps_u), both in one model call."""
    if uncond_context is None or guidance == 1:
        return model(x, t, context)
    if uncond_context.shape[0] == 1 and context.shape[0] != 1:
        uncond_context = uncond_context.expand(context.shape[0], *uncond_context.shape[1:])
    eps_u, eps_c = model(torch.cat([x, x]), t, torch.cat([uncond_context, context])).chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


@torch.no_grad()
def sample(model, latents: Tensor, context: Tensor, uncond_context: Tensor | None = None, num_steps: int = 50,
           guidance: float = 7.5, eta: float = 0.0, generator: torch.Generator | None = None,
           progress: bool = False, alphas: Tensor | None = None) -> Tensor:
    """Classifier-free guided DDIM sampling from x_T = `latents` down to x_0 (the reverse process, EI² Eq. 1, with
    DDIM Eq. 12 as its step), SD v1-4 settings: `timesteps(num_steps)`, t_prev = t - 1000 // num_steps.

    With guidance != 1 the unconditional and conditional passes run as one model call on the batch
    cat([x, x]) with contexts cat([uncond_context, context]) (uncond_context of batch 1 is expanded). guidance == 1
    runs the conditional model alone. context (and uncond_context) have the latents' batch size. `alphas`: the model's
    schedule (`schedule`; None: SD v1-4's). Returns x_0 latents.
    """
    if guidance != 1 and uncond_context is None:
        raise ValueError("guidance != 1 needs uncond_context (the empty-prompt embeddings); pass guidance=1 to sample "
                         "without classifier-free guidance")
    alphas = _alphas_for(latents, alphas)
    ts = timesteps(num_steps)
    ratio = 1000 // num_steps
    ts_device = ts.to(latents.device)  # one copy; ts_device[i] is the 0-d tensor handed to the model
    x = latents
    for i, t in enumerate(tqdm(ts.tolist(), disable=not progress, desc="DDIM")):
        eps = _eps(model, x, ts_device[i], context, uncond_context, guidance)
        x = step(eps, t, t - ratio, x, alphas, eta=eta, generator=generator)
    return x


@torch.no_grad()
def invert(model, latents: Tensor, context: Tensor, num_steps: int = 50, progress: bool = False,
           return_all: bool = False, alphas: Tensor | None = None):
    """DDIM inversion x_0 -> x_T (the initial latent of EI² Eq. 1), with Tune-A-Video's semantics.

    Tune-A-Video's `ddim_inversion` / `next_step` (tuneavideo/util.py) runs the deterministic DDIM update (Eq. 12,
    eta = 0) backwards, from a lower noise level to a higher one, using eps predicted at the lower one:
    for t in timesteps(num_steps) ascending (1, 21, ..., 981 for 50 steps):
        eps = model(x, t, context)            # note: evaluated at the *target* timestep t
        x = Eq. 12 from a_{t - 1000//num_steps} (alphas_cumprod[0] when that index is negative) to a_t
    So the clean latent is treated as sitting at alphas_cumprod[0], and the result is x at t = 981.
    Identical to diffusers' DDIMInverseScheduler with SD v1-4's config (set_alpha_to_one=False, steps_offset=1).
    No guidance: Tune-A-Video inverts with the empty prompt's embeddings as `context`.

    It is exact only where eps does not depend on x: each step uses eps(x_t) where the exact inverse of the sampling
    step would need eps(x_{t+1}) (a first-order approximation). Returns x_T, or with return_all the list
    [x_0, x_1, ..., x_T] of num_steps + 1 latents (Tune-A-Video's `ddim_inversion` return value). `alphas`: the
    model's schedule (`schedule`; None: SD v1-4's).
    """
    alphas = _alphas_for(latents, alphas)
    ts = timesteps(num_steps).flip(0)
    ratio = 1000 // num_steps
    ts_device = ts.to(latents.device)
    x = latents
    out = [x]
    for i, t in enumerate(tqdm(ts.tolist(), disable=not progress, desc="DDIM inversion")):
        eps = model(x, ts_device[i], context)
        x = _ddim(x, eps, _at(alphas, t - ratio), alphas[t])
        if return_all:
            out.append(x)
    return out if return_all else x
