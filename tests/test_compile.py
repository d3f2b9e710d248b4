"""The video UNet under torch.compile: one graph with nothing that waits for the device, and the same numbers.

A data-dependent operation (boolean-mask indexing, nonzero, .item(), .tolist()) in the forward pass is a host
synchronization on CUDA at every call and a graph break for torch.compile. TorchDynamo finds both without a GPU: it
traces the forward and counts the graphs it had to split. Counted here for every frame attention and temporal module,
in training (with the spectral-norm power iterations) and in eval mode. Fails, for example, with FFAM's former
`others[~torch.eye(n)]` index (29 graph breaks in the tiny model's training forward)."""

import pytest
import torch

from ei2.unet import UNet, UNetConfig, VideoOptions, mark_trainable


@pytest.mark.parametrize("video, training, recompute", [
    (dict(frame_attention="ffam", ratio=2, temporal="stam"), True, True),  # EI², tuning (the job's default mode)
    (dict(frame_attention="ffam", ratio=2, temporal="stam"), False, False),  # EI², inversion and editing
    (dict(frame_attention="sca", temporal="ta"), True, False),  # Tune-A-Video
    (dict(frame_attention="full", temporal="stam", temporal_norm="instancenorm", spectral_norm=False), True, False),
], ids=["ei2-train-recompute", "ei2-eval", "tav-train", "full-instancenorm-train"])
def test_forward_is_one_graph(video, training, recompute):
    torch._dynamo.reset()
    cfg = UNetConfig.tiny()
    model = UNet(cfg, VideoOptions(**video))
    mark_trainable(model)
    model.train(training)
    model.recompute_activations = recompute
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 3, 16, 16, generator=g)  # 3 frames: FFAM's "other frames" index is not trivial
    ctx = torch.randn(1, 77, cfg.cross_attention_dim, generator=g)
    explained = torch._dynamo.explain(model)(x, torch.tensor(50), ctx)
    reasons = [r.reason.splitlines()[0] for r in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons[:3]
    assert explained.graph_count == 1


def test_compiled_tuning_matches_eager():
    """Three EI² tuning steps through torch.compile equal the eager steps bit for bit: losses, tuned weights and the
    spectral norms' u, v buffers (updated in place inside the compiled forward), with recompute_activations on. Backend aot_eager: TorchDynamo and
    AOTAutograd trace the model and its backward as torch.compile does on CUDA; only inductor's kernel generation
    (minutes on a CPU) is left out."""
    from benchmarks.bench.models import EI2, ei2_unet, tuning_step

    cfg = UNetConfig.tiny()
    base = ei2_unet(cfg, 0, **EI2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 3, 16, 16, generator=g)
    ctx = torch.randn(1, 77, cfg.cross_attention_dim, generator=g)
    target = torch.randn(x.shape, generator=g)

    def tune(compiled: bool):
        torch._dynamo.reset()
        model = ei2_unet(cfg, 0, **EI2)
        model.load_state_dict(base.state_dict())  # the same fresh temporal modules too
        mark_trainable(model)
        model.train()
        model.recompute_activations = True  # the job's default: checkpointed elementwise tails inside the graph
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        if compiled:
            model.compile(backend="aot_eager")
        losses = [tuning_step(model, opt, x, torch.tensor(100 * i + 50), ctx, target, None).item() for i in range(3)]
        return losses, model.state_dict()

    eager_losses, eager_state = tune(False)
    compiled_losses, compiled_state = tune(True)
    assert eager_losses[0] != eager_losses[-1]
    assert compiled_losses == eager_losses
    assert any(k.endswith(".u") for k in eager_state)
    for k, v in eager_state.items():
        assert torch.equal(compiled_state[k], v), k
