"""Memory-saving options change memory, not results: gradient checkpointing, selective recomputation and bf16 frozen
weights (fp32 master copies of the trainable tensors, bf16 autocast) follow the fp32 loss trajectory on a tiny model;
recomputation keeps fewer bytes for the backward pass (counted)."""

import pytest
import torch
from tiny_model import write_random_model

from ei2.mini.world import demo_frames
from ei2.pipeline import encode_video, load_models, tune_steps
from ei2.tuned import trainable_parameters
from ei2.unet import VideoOptions

STEPS = 6


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_random_model(tmp_path_factory.mktemp("m") / "model", seed=1)


def trajectory(model, precision="fp32", checkpointing=False, recompute=False) -> tuple[list[float], dict]:
    torch.manual_seed(0)
    models = load_models(str(model), VideoOptions(), torch.device("cpu"), precision)
    models.unet.gradient_checkpointing = checkpointing
    models.unet.recompute_activations = recompute
    frames = torch.from_numpy(demo_frames(4, 64, seed=0)).permute(0, 3, 1, 2).float() / 127.5 - 1
    posterior = encode_video(models, frames)
    names, params = trainable_parameters(models.unet)
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    losses = []
    tune_steps(models, posterior, models.text.encode(["a red circle"]), optimizer,
               torch.Generator().manual_seed(0), 0, STEPS, 1.0, sync_every=1,
               on_sync=lambda step, v: losses.extend(v), progress=False)
    return losses, {n: p.detach().clone() for n, p in zip(names, params)}


def test_gradient_checkpointing_same_trajectory(model):
    """Recomputation runs the same operations: losses and tuned tensors agree to float rounding (1e-5)."""
    base, w0 = trajectory(model)
    ckpt, w1 = trajectory(model, checkpointing=True)
    assert len(base) == STEPS
    assert max(abs(a - b) for a, b in zip(base, ckpt)) < 1e-5
    assert all(torch.allclose(w0[k], w1[k], atol=1e-5) for k in w0)


def test_recompute_activations_same_trajectory_less_kept(model):
    """recompute_activations reruns GroupNorm + SiLU and GEGLU's gate in the backward pass: the same operations on the
    same inputs, so losses and tuned tensors are bit-identical; alone and nested in gradient checkpointing. What the
    backward pass keeps, counted by a saved_tensors_hooks pack hook (storages, parameters excluded), shrinks: the
    GEGLU gate's GELU and the SiLUs' inputs are no longer kept (see benchmarks/saved_activations.py for SD v1-4)."""
    base, w0 = trajectory(model)
    for kwargs in (dict(recompute=True), dict(recompute=True, checkpointing=True)):
        got, w1 = trajectory(model, **kwargs)
        assert got == base, kwargs
        assert all(torch.equal(w0[k], w1[k]) for k in w0), kwargs

    def kept_bytes(recompute: bool) -> int:
        torch.manual_seed(0)
        unet = load_models(str(model), VideoOptions(), torch.device("cpu"), "fp32").unet.train()
        unet.recompute_activations = recompute
        params = {p.untyped_storage().data_ptr() for p in unet.parameters()}
        kept = {}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                kept[st.data_ptr()] = (st, st.nbytes())
            return t

        g = torch.Generator().manual_seed(0)
        x, ctx = torch.randn(1, 4, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            unet(x, torch.tensor(10), ctx)
        return sum(n for _, n in kept.values())

    plain, lean = kept_bytes(False), kept_bytes(True)
    assert lean < 0.9 * plain, (lean, plain)


def test_bf16_frozen_weights_same_trajectory(model):
    """bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.2 %), so per-step losses (about 1) agree to 0.02;
    the trainable tensors stay fp32 master copies."""
    base, _ = trajectory(model)
    half, weights = trajectory(model, precision="bf16")
    assert max(abs(a - b) for a, b in zip(base, half)) < 0.02
    assert all(w.dtype == torch.float32 for w in weights.values())
    models = load_models(str(model), VideoOptions(), torch.device("cpu"), "bf16")
    frozen = [p for p in models.unet.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
