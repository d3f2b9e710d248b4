"""The video UNet is one graph for torch.compile, with nothing that waits for the device.

A data-dependent operation (boolean-mask indexing, nonzero, .item(), .tolist()) in the forward pass is a host
synchronization on CUDA at every call and a graph break for torch.compile. TorchDynamo finds both without a GPU: it
traces the forward and counts the graphs it had to split. Counted here for every frame attention and temporal module,
in training (with the spectral-norm power iterations) and in eval mode. Fails, for example, with FFAM's former
`others[~torch.eye(n)]` index (29 graph breaks in the tiny model's training forward)."""

import pytest
import torch

from ei2.unet import UNet, UNetConfig, VideoOptions, mark_trainable


@pytest.mark.parametrize("video, training", [
    (dict(frame_attention="ffam", ratio=2, temporal="stam"), True),  # EI², tuning
    (dict(frame_attention="ffam", ratio=2, temporal="stam"), False),  # EI², inversion and editing
    (dict(frame_attention="sca", temporal="ta"), True),  # Tune-A-Video
    (dict(frame_attention="full", temporal="stam", temporal_norm="instancenorm", spectral_norm=False), True),
], ids=["ei2-train", "ei2-eval", "tav-train", "full-instancenorm-train"])
def test_forward_is_one_graph(video, training):
    torch._dynamo.reset()
    cfg = UNetConfig.tiny()
    model = UNet(cfg, VideoOptions(**video))
    mark_trainable(model)
    model.train(training)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 3, 16, 16, generator=g)  # 3 frames: FFAM's "other frames" index is not trivial
    ctx = torch.randn(1, 77, cfg.cross_attention_dim, generator=g)
    explained = torch._dynamo.explain(model)(x, torch.tensor(50), ctx)
    reasons = [r.reason.splitlines()[0] for r in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons[:3]
    assert explained.graph_count == 1
