"""Memory-saving options change memory, not results: gradient checkpointing and bf16 frozen weights (fp32 master
copies of the trainable tensors, bf16 autocast) follow the fp32 loss trajectory on a tiny model."""

import pytest
import torch

from ei2.demo import write_random_model
from ei2.pipeline import encode_video, load_models, tune_steps
from ei2.tuned import trainable_parameters
from ei2.unet import VideoOptions
from ei2.video import demo_frames

STEPS = 6


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_random_model(tmp_path_factory.mktemp("m") / "model", seed=1)


def trajectory(model, precision="fp32", checkpointing=False) -> tuple[list[float], dict]:
    torch.manual_seed(0)
    models = load_models(str(model), VideoOptions(), torch.device("cpu"), precision)
    models.unet.gradient_checkpointing = checkpointing
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
