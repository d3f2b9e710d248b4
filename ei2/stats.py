"""Pure statistics for evaluation and for the covariate-shift diagnostic, and the hooks that collect the latter.

CLIP scores (notes.md section 4, the LOVEU-TGVE protocol of Tune-A-Video's authors), on embeddings:
- `frame_consistency(image_emb)`: 100 x mean cosine similarity over all pairs of distinct frames.
- `textual_alignment(image_emb, text_emb)`: mean over frames of 100 x cosine(frame, prompt). No clamping at zero
  (torchmetrics' CLIPScore clamps with max(., 0); the protocol does not, and real CLIP scores are positive anyway).

Temporal-module statistics (paper section 4.2-4.3), on z of shape (L, n, d): the n frames at each of L spatial
locations (b * h * w of one UNet level), d channels, the shape a temporal module sees. Each function returns one
value per location, shape (L,); `RunningStats` averages them over locations, calls and batches.

- mu_rv(z) = ||(1/n) sum_i z^i||_2, the norm of the temporal mean (the mean of the paper's rv(z)).
- mu_z = |(1/(n d)) sum_{i,j} z^{i,j}|, the whole-tensor mean the paper says LayerNorm centers with.
- mean shift = ||mu_n(out) - mu_n(in)||_2 with out = z + delta (the module's residual output).
- covariance ratio = ||Sigma_out|| / ||Sigma_in||, Sigma the d x d temporal covariance of the n frames,
  (1/n) sum_i (z^i - mu)(z^i - mu)^T. It has rank <= n - 1 and the same non-zero eigenvalues as the n x n Gram
  matrix (1/n) Zc Zc^T, which is what is computed (cheap for d = 1280). The spectral norm (largest eigenvalue) is
  the headline, because the paper's STAM bound ||Sigma'|| <= 2 ||Sigma|| is stated under it; the Frobenius norm
  (the norm of Eq. 7) is recorded too. The 1/n vs 1/(n-1) convention cancels in the ratio.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Mapping

import torch
from torch import Tensor, nn

from .errors import Ei2Error

COV_NORMS = ("spectral", "fro")


# --- CLIP scores -------------------------------------------------------------------------------------------------


def _unit(x: Tensor) -> Tensor:
    x = x.double()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def frame_consistency(image_emb: Tensor) -> float:
    """100 x mean of cos(e_i, e_j) over the n (n - 1) ordered pairs i != j of the n frame embeddings (n, D)."""
    if image_emb.dim() != 2 or image_emb.shape[0] < 2:
        raise ValueError(f"frame consistency needs (n >= 2, D) embeddings, got {tuple(image_emb.shape)}")
    e = _unit(image_emb)
    n = e.shape[0]
    sim = e @ e.T
    off_diagonal = sim.sum() - sim.diagonal().sum()
    return float(100.0 * off_diagonal / (n * (n - 1)))


def textual_alignment(image_emb: Tensor, text_emb: Tensor) -> float:
    """Mean over the n frames (n, D) of 100 x cos(frame embedding, prompt embedding (D,) or (1, D))."""
    if image_emb.dim() != 2 or image_emb.shape[0] < 1:
        raise ValueError(f"textual alignment needs (n, D) image embeddings, got {tuple(image_emb.shape)}")
    t = text_emb.reshape(-1)
    if t.shape[0] != image_emb.shape[1]:
        raise ValueError(f"text embedding of size {t.shape[0]} for image embeddings of size {image_emb.shape[1]}")
    return float(100.0 * (_unit(image_emb) @ _unit(t)).mean())


# --- Temporal statistics, per spatial location ------------------------------------------------------------------


def _check(z: Tensor) -> None:
    if z.dim() != 3:
        raise ValueError(f"expected temporal features (L, n, d), got {tuple(z.shape)}")


def temporal_mean(z: Tensor) -> Tensor:
    """(L, n, d) -> (L, d): the mean over the n frames at each location."""
    _check(z)
    return z.mean(dim=-2)


def mu_rv(z: Tensor) -> Tensor:
    """(L,): ||temporal mean||_2 at each location (mu_rv(z) of the paper, as a norm)."""
    return temporal_mean(z.double()).norm(dim=-1)


def mu_z(z: Tensor) -> Tensor:
    """(L,): |mean over the n frames and d channels| at each location (mu_z of the paper)."""
    _check(z)
    return z.double().mean(dim=(-2, -1)).abs()


def mean_shift(z_in: Tensor, z_out: Tensor) -> Tensor:
    """(L,): ||temporal mean of the output - temporal mean of the input||_2 at each location."""
    return (temporal_mean(z_out.double()) - temporal_mean(z_in.double())).norm(dim=-1)


def temporal_gram(z: Tensor) -> Tensor:
    """(L, n, n) = (1/n) Zc Zc^T with Zc = z - temporal mean; its eigenvalues are the non-zero ones of the d x d
    temporal covariance (1/n) Zc^T Zc."""
    _check(z)
    zc = z.double() - z.double().mean(dim=-2, keepdim=True)
    return zc @ zc.transpose(-1, -2) / z.shape[-2]


def _gram_norm(g: Tensor, norm: str) -> Tensor:
    if norm == "spectral":
        return torch.linalg.eigvalsh(g)[..., -1].clamp_min(0.0)
    if norm == "fro":
        return g.flatten(-2).norm(dim=-1)  # ||Zc^T Zc||_F = ||Zc Zc^T||_F: same singular values
    raise ValueError(f"unknown covariance norm {norm!r}; choose from {', '.join(COV_NORMS)}")


def covariance_norm(z: Tensor, norm: str = "spectral") -> Tensor:
    """(L,): ||Sigma|| of the temporal covariance at each location; norm "spectral" (largest eigenvalue) or "fro"."""
    return _gram_norm(temporal_gram(z), norm)


def _ratio(c_in: Tensor, c_out: Tensor, rel_eps: float = 1e-10) -> Tensor:
    floor = rel_eps * float(c_in.max()) if c_in.numel() else 0.0
    valid = c_in > max(floor, 1e-300)
    return torch.where(valid, c_out / torch.where(valid, c_in, torch.ones_like(c_in)), torch.full_like(c_in, math.nan))


def covariance_ratio(z_in: Tensor, z_out: Tensor, norm: str = "spectral", rel_eps: float = 1e-10) -> Tensor:
    """(L,): ||Sigma_out|| / ||Sigma_in|| at each location; NaN where the input barely varies over the frames
    (||Sigma_in|| <= rel_eps x its largest value over the locations), where the ratio means nothing."""
    return _ratio(covariance_norm(z_in, norm), covariance_norm(z_out, norm), rel_eps)


def location_stats(z: Tensor, z_hat: Tensor | None, delta: Tensor) -> dict[str, Tensor]:
    """Every per-location statistic of one temporal module call, each (L,) float64.

    z: the module's input (L, n, d); z_hat: its normalized input norm_temp(z) (None if unknown); delta: the residual
    branch attn_temp(z_hat), so the module's output is z + delta.
    """
    _check(z)
    z = z.detach().double()
    delta = delta.detach().double()
    d = z.shape[-1]
    g_in, g_out = temporal_gram(z), temporal_gram(z + delta)
    stats = {
        "mu_rv": mu_rv(z),
        "mu_z": mu_z(z),
        "mean_shift": temporal_mean(delta).norm(dim=-1),  # mean_n(z + delta) - mean_n(z) = mean_n(delta)
    }
    stats["mu_rv_rms"] = stats["mu_rv"] / math.sqrt(d)
    for norm, suffix in (("spectral", ""), ("fro", "_fro")):
        c_in, c_out = _gram_norm(g_in, norm), _gram_norm(g_out, norm)
        stats[f"cov_in{suffix}"], stats[f"cov_out{suffix}"] = c_in, c_out
        stats[f"cov_ratio{suffix}"] = _ratio(c_in, c_out)
    if z_hat is not None:
        stats["mu_rv_hat"] = mu_rv(z_hat.detach())
    return stats


class RunningStats:
    """Averages of per-location statistics over every location of every call (NaNs skipped, and counted).

    `result()` gives the mean of each statistic, plus `cov_ratio_pooled` = mean ||Sigma_out|| / mean ||Sigma_in||
    (the ratio of averages, robust to locations with a tiny input covariance) and the same for Frobenius.
    """

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.skipped: dict[str, int] = {}
        self.calls = 0

    def update(self, stats: Mapping[str, Tensor]) -> None:
        self.calls += 1
        for key, values in stats.items():
            values = values.reshape(-1)
            finite = torch.isfinite(values)
            self.sums[key] = self.sums.get(key, 0.0) + float(values[finite].sum())
            self.counts[key] = self.counts.get(key, 0) + int(finite.sum())
            self.skipped[key] = self.skipped.get(key, 0) + int((~finite).sum())

    def merge(self, other: "RunningStats") -> "RunningStats":
        for key in other.sums:
            self.sums[key] = self.sums.get(key, 0.0) + other.sums[key]
            self.counts[key] = self.counts.get(key, 0) + other.counts[key]
            self.skipped[key] = self.skipped.get(key, 0) + other.skipped[key]
        self.calls += other.calls
        return self

    def mean(self, key: str) -> float:
        return self.sums[key] / self.counts[key] if self.counts.get(key) else math.nan

    def result(self) -> dict[str, float]:
        out = {key: self.mean(key) for key in self.sums}
        for suffix in ("", "_fro"):
            if f"cov_in{suffix}" in out:
                c_in, c_out = out[f"cov_in{suffix}"], out[f"cov_out{suffix}"]
                out[f"cov_ratio_pooled{suffix}"] = c_out / c_in if c_in > 0 else math.nan
        out["locations"] = self.counts.get("mu_rv", 0)
        out["degenerate_locations"] = self.skipped.get("cov_ratio", 0)
        return out


# --- Hooks on a UNet's temporal modules --------------------------------------------------------------------------


def layer_name(module_name: str) -> str:
    """'down_blocks.0.attentions.1.transformer_blocks.0' -> 'down_blocks.0.attentions.1' (SD has one block each)."""
    suffix = ".transformer_blocks.0"
    return module_name[: -len(suffix)] if module_name.endswith(suffix) else module_name


def short_name(layer: str) -> str:
    """'down_blocks.0.attentions.1' -> 'D0.1', 'mid_block.attentions.0' -> 'M', 'up_blocks.3.attentions.2' -> 'U3.2'."""
    parts = layer.split(".")
    if parts[0] == "mid_block":
        return "M" if parts[-1] == "0" else f"M.{parts[-1]}"
    if parts[0] in ("down_blocks", "up_blocks") and len(parts) >= 4:
        return f"{parts[0][0].upper()}{parts[1]}.{parts[3]}" + ("" if len(parts) == 4 else "+")
    return layer


def temporal_blocks(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """(layer name, block) of every block holding a temporal module (`norm_temp` + `attn_temp`), in forward order."""
    return [(layer_name(name), m) for name, m in unet.named_modules()
            if getattr(m, "attn_temp", None) is not None and getattr(m, "norm_temp", None) is not None]


class TemporalProbe:
    """Context manager: while active, every temporal module's calls update per-layer `RunningStats`, kept per `tag`
    (set `probe.tag` before a forward pass, e.g. to the timestep)."""

    def __init__(self, unet: nn.Module):
        self.blocks = temporal_blocks(unet)
        if not self.blocks:
            raise Ei2Error("the model has no temporal modules (temporal: none); nothing to diagnose")
        self.stats: dict[str, dict[object, RunningStats]] = {layer: {} for layer, _ in self.blocks}
        self.shapes: dict[str, tuple[int, int]] = {}
        self.tag: object = "all"
        self._pending: dict[str, list] = {}
        self._handles: list = []

    def __enter__(self) -> "TemporalProbe":
        for layer, block in self.blocks:
            self._handles += [
                block.norm_temp.register_forward_pre_hook(partial(self._on_input, layer)),
                block.norm_temp.register_forward_hook(partial(self._on_normalized, layer)),
                block.attn_temp.register_forward_hook(partial(self._on_delta, layer)),
            ]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._pending.clear()

    def _on_input(self, layer, module, args):
        self._pending[layer] = [args[0].detach(), None]

    def _on_normalized(self, layer, module, args, output):
        self._pending[layer][1] = output.detach()

    def _on_delta(self, layer, module, args, output):
        z, z_hat = self._pending.pop(layer)
        self.stats[layer].setdefault(self.tag, RunningStats()).update(location_stats(z, z_hat, output))
        self.shapes[layer] = (int(z.shape[-2]), int(z.shape[-1]))

    def report(self) -> list[dict]:
        """One entry per layer: name, short name, frames, channels, stats over all tags, and per tag."""
        out = []
        for layer, _ in self.blocks:
            tags = self.stats[layer]
            total = RunningStats()
            for s in tags.values():
                total.merge(s)
            n, d = self.shapes.get(layer, (0, 0))
            out.append({"layer": layer, "short": short_name(layer), "frames": n, "dim": d, "stats": total.result(),
                        "per_timestep": {str(t): s.result() for t, s in tags.items()}})
        return out
