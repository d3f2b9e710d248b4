"""The from-scratch UNet against diffusers' UNet2DConditionModel (the numerical oracle) on random weights saved in the
published layout; the CompVis single-file path; loading errors."""

import gc

import pytest
import torch
import torch.nn.functional as F
from conftest import diffusers_unet, randomize, sd_keys
from safetensors.torch import save_file

from ei2.errors import Ei2Error
from ei2.unet import UNet, UNetConfig, VideoOptions
from ei2.weights import compvis_unet_key_map

IMAGE = dict(frame_attention="self", temporal="none")


def max_rel_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| relative to the output scale max |ref|."""
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """An SD-layout folder (`unet/config.json` + `unet/diffusion_pytorch_model.safetensors`) written by diffusers."""
    root = tmp_path_factory.mktemp("sd-tiny")
    ref = diffusers_unet(UNetConfig.tiny(), seed=0)
    ref.save_pretrained(root / "unet", safe_serialization=True)
    return root, ref


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("batch,h,w,t", [(1, 16, 16, 999), (2, 8, 8, 1), (2, 12, 20, 500)])
def test_tiny_parity_with_diffusers(tiny_folder, seed, batch, h, w, t):
    root, ref = tiny_folder
    # with one frame the default EI² model (FFAM + STAM at creation) is SD's image UNet: IC of one frame is zero
    ours = UNet.from_pretrained(root).eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, h, w, generator=g)
    ctx = torch.randn(batch, 77, 32, generator=g)
    with torch.no_grad():
        expected = ref(x, t, ctx).sample
        got = ours(x[:, :, None], t, ctx)  # (b, 4, 1, h, w)
    assert got.shape == (batch, 4, 1, h, w)
    assert max_rel_diff(got[:, :, 0], expected) <= 1e-4


def test_per_timestep_batch(tiny_folder):
    """A (b,) tensor of timesteps: row k uses t[k]."""
    root, ref = tiny_folder
    ours = UNet.from_pretrained(root, **IMAGE).eval()
    x, ctx, t = torch.randn(3, 4, 8, 8), torch.randn(3, 77, 32), torch.tensor([1, 400, 999])
    with torch.no_grad():
        assert max_rel_diff(ours(x[:, :, None], t, ctx)[:, :, 0], ref(x, t, ctx).sample) <= 1e-4


def test_pseudo_3d_is_per_frame(tiny_folder):
    """Without video modules and with per-frame GroupNorm, a video is SD applied to each frame (pseudo-3D convs)."""
    root, ref = tiny_folder
    ours = UNet.from_pretrained(root, resnet_norm="frame", **IMAGE).eval()
    x, ctx = torch.randn(2, 4, 3, 8, 8), torch.randn(2, 77, 32)
    with torch.no_grad():
        got = ours(x, 10, ctx)
        for f in range(3):
            assert max_rel_diff(got[:, :, f], ref(x[:, :, f], 10, ctx).sample) <= 1e-4


def test_resnet_norm_over_frames(tiny_folder):
    """The default (Tune-A-Video) GroupNorm pools statistics over frames: a video then differs from per-frame SD,
    and equals an explicit 5-D GroupNorm over (c, n, h, w)."""
    from ei2.unet import VideoGroupNorm

    norm = VideoGroupNorm(4, 8, eps=1e-5)
    randomize(norm, 3)
    x = torch.randn(2 * 3, 8, 5, 5)  # (b*n, c, h, w), b = 2, n = 3
    five_d = x.view(2, 3, 8, 5, 5).transpose(1, 2)  # (b, c, n, h, w)
    expected = torch.nn.functional.group_norm(five_d, 4, norm.weight, norm.bias, 1e-5).transpose(1, 2).reshape(6, 8, 5, 5)
    assert torch.allclose(norm(x, 3), expected, atol=1e-5)
    assert not torch.allclose(norm(x, 3), norm(x, 1), atol=1e-3)


def test_conv_norm_out_over_frames_by_hand():
    """conv_norm_out, the UNet's last GroupNorm, normalizes the 5-D video (b, c, n, h, w) as Tune-A-Video's does:
    statistics over frames and pixels. Hand-made input: frame 1 is frame 0 shifted by +3, so per-frame statistics
    would map both frames to the same values; the video statistics keep them 3 / std apart."""
    m = randomize(UNet(UNetConfig.tiny(), VideoOptions(frame_attention="self", temporal="none")), 4)
    norm = m.conv_norm_out  # 8 groups of 32 channels, weight about 1
    frame = torch.arange(32 * 2 * 2, dtype=torch.float32).view(32, 2, 2).cos()
    x = torch.stack([frame, frame + 3.0]).repeat(2, 1, 1, 1)  # (b*n, c, h, w), b = 2, n = 2
    five_d = x.view(2, 2, 32, 2, 2).transpose(1, 2)  # (b, c, n, h, w)
    expected = F.group_norm(five_d, 8, norm.weight, norm.bias, 1e-5).transpose(1, 2).reshape(4, 32, 2, 2)
    assert torch.allclose(norm(x, 2), expected, atol=1e-5)
    per_frame = F.group_norm(x, 8, norm.weight, norm.bias, 1e-5)
    assert torch.allclose(per_frame[0], per_frame[1], atol=1e-5)  # what per-frame statistics would give
    assert not torch.allclose(norm(x, 2)[0], norm(x, 2)[1], atol=1e-2)
    frame_norm = UNet(UNetConfig.tiny(), VideoOptions(frame_attention="self", temporal="none", resnet_norm="frame"))
    assert torch.allclose(frame_norm.conv_norm_out(x, 2), F.group_norm(x, 8, None, None, 1e-5), atol=1e-6)  # per frame


@pytest.mark.parametrize("resnet_norm", ["video", "frame"])
def test_unet_output_norm_statistics(resnet_norm):
    """In the whole UNet the input of conv_out is SiLU(GroupNorm(x)) with the statistics of the 5-D video for
    resnet_norm "video" (Tune-A-Video) and per frame for "frame", x being what reaches conv_norm_out."""
    torch.manual_seed(0)
    m = randomize(UNet(UNetConfig.tiny(), VideoOptions(resnet_norm=resnet_norm)), 5).eval()
    seen = {}
    m.conv_norm_out.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    m.conv_out.register_forward_pre_hook(lambda mod, args: seen.update(y=args[0]))
    with torch.no_grad():
        m(torch.randn(2, 4, 3, 8, 8), 10, torch.randn(2, 77, 32))
    x, norm = seen["x"], m.conv_norm_out  # x (b*n, c, h, w)
    five_d = x.view(2, 3, *x.shape[1:]).transpose(1, 2)  # (b, c, n, h, w)
    over_frames = F.group_norm(five_d, 8, norm.weight, norm.bias, 1e-5).transpose(1, 2).reshape(x.shape)
    per_frame = F.group_norm(x, 8, norm.weight, norm.bias, 1e-5)
    expected, other = (over_frames, per_frame) if resnet_norm == "video" else (per_frame, over_frames)
    assert torch.allclose(seen["y"], F.silu(expected), atol=1e-5)
    assert not torch.allclose(seen["y"], F.silu(other), atol=1e-3)


def test_full_sd_v1_4_parity(tmp_path):
    """The full SD v1-4 configuration (859.5 M parameters, 686 tensors as the key table lists) at a 16x16 latent."""
    cfg = UNetConfig()
    ref = diffusers_unet(cfg, seed=7)
    ref.save_pretrained(tmp_path / "unet", safe_serialization=True)
    ref_keys = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ref_keys == {k: s for k, s, _ in sd_keys("unet")}
    ours = UNet.from_pretrained(tmp_path).eval()
    assert sum(p.numel() for n, p in ours.named_parameters() if "_temp." not in n) == 859_520_964
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 768, generator=g)
    with torch.no_grad():
        expected = ref(x, 981, ctx).sample
        del ref
        gc.collect()
        got = ours(x[:, :, None], 981, ctx)[:, :, 0]
    assert max_rel_diff(got, expected) <= 1e-4


def compvis_state(ref_state: dict, config: UNetConfig) -> dict:
    return {compvis: ref_state[key].clone() for key, compvis in compvis_unet_key_map(config).items()}


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_compvis(tiny_folder, tmp_path, suffix):
    root, ref = tiny_folder
    state = compvis_state(ref.state_dict(), UNetConfig.tiny())
    state["first_stage_model.encoder.conv_in.weight"] = torch.zeros(1)  # other components share the file
    path = tmp_path / f"sd{suffix}"
    if suffix == ".ckpt":
        torch.save({"state_dict": state, "global_step": 470000}, path)
    else:
        save_file(state, str(path))
    # a single file carries no config (SD v1-4's is the default): the tiny one is passed
    ours = UNet.from_pretrained(path, config=UNetConfig.tiny(), **IMAGE).eval()
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    with torch.no_grad():
        assert torch.equal(ours(x[:, :, None], 5, ctx)[:, :, 0], UNet.from_pretrained(root, **IMAGE).eval()(x[:, :, None], 5, ctx)[:, :, 0])


def test_ckpt_is_not_unpickled(tmp_path):
    """A .ckpt holding arbitrary pickled objects is refused (weights_only), with the file named."""

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": Evil()}}, path)
    with pytest.raises(Ei2Error, match="evil.ckpt.*never unpickles"):
        UNet.from_pretrained(path)


# --- bad input: every error names the file or the key ----------------------------------------------------------------


def write_unet(folder, state, config=UNetConfig.tiny()):
    import json

    (folder / "unet").mkdir(parents=True, exist_ok=True)
    (folder / "unet/config.json").write_text(json.dumps(config.to_diffusers_dict()))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "unet/diffusion_pytorch_model.safetensors"))


def test_missing_folder(tmp_path):
    with pytest.raises(Ei2Error, match=f"model not found at {tmp_path / 'nope'}.*weights/README.md"):
        UNet.from_pretrained(tmp_path / "nope")


def test_missing_file(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(Ei2Error, match="no unet weights.*unet/diffusion_pytorch_model.safetensors"):
        UNet.from_pretrained(tmp_path)


def test_wrong_shape_missing_and_extra_keys(tiny_folder, tmp_path):
    _, ref = tiny_folder
    state = dict(ref.state_dict())
    state["conv_in.weight"] = torch.zeros(32, 4, 1, 1)
    del state["mid_block.attentions.0.proj_out.bias"]
    state["mid_block.extra.weight"] = torch.zeros(2)
    write_unet(tmp_path, state)
    with pytest.raises(Ei2Error) as e:
        UNet.from_pretrained(tmp_path)
    msg = str(e.value)
    assert "diffusion_pytorch_model.safetensors" in msg
    assert "1 missing: mid_block.attentions.0.proj_out.bias" in msg
    assert "1 unexpected: mid_block.extra.weight" in msg
    assert "conv_in.weight: file (32, 4, 1, 1) vs model (32, 4, 3, 3)" in msg
    assert "\n" not in msg


def test_truncated_safetensors(tiny_folder, tmp_path):
    _, ref = tiny_folder
    write_unet(tmp_path, ref.state_dict())
    weights = tmp_path / "unet/diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(Ei2Error, match="diffusion_pytorch_model.safetensors is not a readable safetensors file"):
        UNet.from_pretrained(tmp_path)


def test_unknown_video_option(tiny_folder):
    with pytest.raises(Ei2Error, match="unknown video option"):
        UNet.from_pretrained(tiny_folder[0], frame_atention="ffam")
    with pytest.raises(Ei2Error, match="frame_attention='fam' is not one of self, sca, ffam, full"):
        UNet.from_pretrained(tiny_folder[0], frame_attention="fam")
