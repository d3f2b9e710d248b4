"""The covariate-shift diagnostic: statistics on inputs with known answers, the hooks on real temporal modules, and
`python -m ei2.diagnose` end to end on a tiny model in the SD folder layout (--compare ta,stam, --tune-steps, --run)."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from ei2.attention import instance_centering
from ei2.chart import nice_ticks
from ei2.diagnose import COMPARE, main, parser, subjects_from_args
from ei2.mini.tokenizer import write_tiny_text_model
from ei2.stats import (RunningStats, TemporalProbe, covariance_norm, covariance_ratio, layer_name, location_stats,
                       mean_shift, mu_rv, mu_z, short_name, temporal_mean)
from ei2.unet import VARIANTS, BasicTransformerBlock, UNet, UNetConfig, VideoOptions
from ei2.vae import AutoencoderKL, VAEConfig
from ei2.weights import save_safetensors

WORDS = ["a", "red", "circle", "moving", "right", "on", "white"]
CAPTION = "a red circle moving right"


def features(L=6, n=5, d=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, n, d, generator=g, dtype=dtype) + torch.randn(L, 1, d, generator=g, dtype=dtype)


# --- statistics with known answers --------------------------------------------------------------------------------


def test_ic_gives_zero_temporal_mean_exactly():
    z = features(dtype=torch.float32)
    assert mu_rv(z).min() > 0.1  # the input does have a temporal mean
    assert mu_rv(instance_centering(z)).max() < 1e-6
    assert mu_rv(instance_centering(z.double())).max() < 1e-14


def test_means_by_hand():
    z = features()
    L, n, d = z.shape
    for k in range(L):
        m = [sum(z[k, i, j].item() for i in range(n)) / n for j in range(d)]
        assert mu_rv(z)[k].item() == pytest.approx(math.sqrt(sum(x * x for x in m)), rel=1e-12)
        assert mu_z(z)[k].item() == pytest.approx(abs(sum(m) / d), rel=1e-12)
    assert torch.allclose(temporal_mean(z), z.mean(1))
    const = torch.full((3, 4, 9), -2.5)
    assert torch.allclose(mu_z(const), torch.full((3,), 2.5, dtype=torch.float64))
    assert torch.allclose(mu_rv(const), torch.full((3,), 2.5 * 3, dtype=torch.float64))


def test_constant_shift_is_measured_as_that_shift():
    z = features()
    c = torch.linspace(-1, 2, z.shape[-1], dtype=torch.float64)
    assert torch.allclose(mean_shift(z, z + c), c.norm().expand(z.shape[0]), rtol=1e-12)
    assert torch.allclose(covariance_ratio(z, z + c), torch.ones(z.shape[0], dtype=torch.float64), rtol=1e-9)


@pytest.mark.parametrize("norm", ["spectral", "fro"])
def test_covariance_ratio_identity_and_scaling(norm):
    z = features()
    assert torch.allclose(covariance_ratio(z, z, norm), torch.ones(z.shape[0], dtype=torch.float64), rtol=1e-12)
    for s in (0.5, 3.0, -2.0):
        assert torch.allclose(covariance_ratio(z, s * z, norm), torch.full((z.shape[0],), s * s, dtype=torch.float64),
                              rtol=1e-9)


def test_covariance_norm_equals_the_d_by_d_covariance():
    z = features(L=4, n=5, d=12)  # rank n - 1 < d: the Gram trick must still give the d x d norms
    for k in range(z.shape[0]):
        zc = z[k] - z[k].mean(0)
        sigma = zc.T @ zc / z.shape[1]  # (d, d), population covariance over the frames
        assert covariance_norm(z, "spectral")[k].item() == pytest.approx(torch.linalg.matrix_norm(sigma, 2).item(),
                                                                        rel=1e-10)
        assert covariance_norm(z, "fro")[k].item() == pytest.approx(torch.linalg.matrix_norm(sigma).item(), rel=1e-10)
    with pytest.raises(ValueError):
        covariance_norm(z, "nuclear")


def test_degenerate_locations_are_skipped():
    z = features(L=3)
    z[1] = z[1, :1]  # location 1: the same vector in every frame, no temporal variance
    ratio = covariance_ratio(z, 2 * z)
    assert math.isnan(ratio[1]) and torch.allclose(ratio[[0, 2]], torch.full((2,), 4.0, dtype=torch.float64))
    acc = RunningStats()
    acc.update(location_stats(z, None, z))  # out = 2 z
    r = acc.result()
    assert r["cov_ratio"] == pytest.approx(4.0) and r["degenerate_locations"] == 1 and r["locations"] == 3


def test_running_stats_average_over_calls_and_locations():
    acc = RunningStats()
    z1, z2 = features(L=2, seed=1), features(L=5, seed=2)
    acc.update(location_stats(z1, z1, torch.zeros_like(z1)))
    acc.update(location_stats(z2, z2, torch.zeros_like(z2)))
    r = acc.result()
    assert r["mu_rv"] == pytest.approx(torch.cat([mu_rv(z1), mu_rv(z2)]).mean().item(), rel=1e-12)
    assert r["cov_ratio"] == pytest.approx(1.0) and r["mean_shift"] == 0.0 and r["locations"] == 7


# --- the hooks on real modules ------------------------------------------------------------------------------------


class ConstantShift(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, z):
        return self.c.expand_as(z)


class ToyBlock(nn.Module):
    """A block computing z + attn_temp(norm_temp(z)), as BasicTransformerBlock does."""

    def __init__(self, c):
        super().__init__()
        self.norm_temp = nn.LayerNorm(c.shape[-1])
        self.attn_temp = ConstantShift(c)

    def forward(self, z):
        return z + self.attn_temp(self.norm_temp(z))


def test_probe_measures_a_constant_shift_before_the_next_module():
    c = torch.tensor([0.5, -1.0, 2.0, 0.0])
    model = nn.Sequential(ToyBlock(c), ToyBlock(torch.zeros(4)))
    z = torch.randn(10, 6, 4)
    with TemporalProbe(model) as probe:
        model(z)
    layers = {l["layer"]: l for l in probe.report()}
    first, second = layers["0"]["stats"], layers["1"]["stats"]
    assert first["mean_shift"] == pytest.approx(c.norm().item(), rel=1e-6)
    assert first["cov_ratio"] == pytest.approx(1.0, rel=1e-5)
    # the second module sees the first one's output: its input mean moved by exactly c
    assert second["mu_rv"] == pytest.approx((z.mean(1) + c).norm(dim=-1).mean().item(), rel=1e-5)
    assert second["mean_shift"] == 0.0 and layers["1"]["frames"] == 6 and layers["1"]["dim"] == 4
    # hooks are gone after the with block
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("temporal", ["ta", "stam"])
def test_probe_on_real_temporal_modules(temporal):
    torch.manual_seed(0)
    n, l, d = 4, 9, 32
    block = BasicTransformerBlock(d, 2, 16, 1e-6, VideoOptions(temporal=temporal)).eval()
    x, ctx = torch.randn(n, l, d), torch.randn(n, 5, 16)
    with TemporalProbe(block) as probe, torch.no_grad():
        block(x, ctx, n, (3, 3))
    stats = probe.report()[0]["stats"]
    assert probe.report()[0]["frames"] == n and stats["locations"] == l
    if temporal == "ta":  # W_L = 0 at creation: TA adds its bias, a constant shift
        assert stats["mean_shift"] == pytest.approx(block.attn_temp.to_out[0].bias.norm().item(), rel=1e-5)
        assert stats["cov_ratio"] == pytest.approx(1.0, abs=1e-5)
        assert stats["mu_rv_hat"] > 1e-2  # LayerNorm does not center over the frames
    else:
        assert stats["mu_rv_hat"] < 1e-6  # IC does
        assert stats["mean_shift"] > 0 and stats["cov_ratio"] > 0


def test_names_and_ticks():
    assert layer_name("down_blocks.0.attentions.1.transformer_blocks.0") == "down_blocks.0.attentions.1"
    assert short_name("down_blocks.0.attentions.1") == "D0.1"
    assert short_name("up_blocks.3.attentions.2") == "U3.2"
    assert short_name("mid_block.attentions.0") == "M"
    ticks = nice_ticks(0.0, 0.93)
    assert ticks[0] == 0.0 and ticks[-1] >= 0.93 and 3 <= len(ticks) <= 8
    assert len(nice_ticks(1.0, 1.0)) >= 2


def test_compare_names_read_the_variants_table():
    """--compare's names (unchanged, in this order) pick the temporal fields of ei2.unet.VARIANTS; the frame attention
    is diagnose's own (--frame-attention), replaced on a copy, never in the table."""
    assert list(COMPARE) == ["ta", "stam", "ln", "ln_noaffine", "no_norm", "instancenorm", "ic"]
    temporal = {name: (VARIANTS[key].video.temporal, VARIANTS[key].video.temporal_norm)
                for name, key in COMPARE.items()}
    assert temporal == {"ta": ("ta", None), "stam": ("stam", None), "ln": ("ta", "layernorm"),
                        "ln_noaffine": ("ta", "layernorm_noaffine"), "no_norm": ("ta", "none"),
                        "instancenorm": ("ta", "instancenorm"), "ic": ("ta", "ic")}
    assert VARIANTS["ta_ln"].video.temporal_norm_trainable and not VARIANTS["tav"].video.temporal_norm_trainable
    subject = subjects_from_args(parser().parse_args(["--model", "m", "--video", "v", "--caption", "c", "--compare",
                                                      "ta,ln", "--frame-attention", "full", "--ratio", "3"]))[1]
    assert (subject.label, subject.description) == ("ln", VARIANTS["ta_ln"].module)
    assert subject.video_options == dict(dataclasses.asdict(VARIANTS["ta_ln"].video), frame_attention="full", ratio=3)
    assert VARIANTS["ta_ln"].video.frame_attention == "sca"  # the table itself unchanged



# --- the command end to end on a tiny SD-layout model -------------------------------------------------------------


def write_component(folder: Path, config: dict, module: nn.Module) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_safetensors(module.state_dict(), folder / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from ei2.mini.world import make_demo_clip

    root = tmp_path_factory.mktemp("diag")
    sd = root / "tiny-sd"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        write_component(sd / "unet", UNetConfig.tiny().to_diffusers_dict(),
                        UNet(UNetConfig.tiny(), VideoOptions(frame_attention="self", temporal="none")))
        write_component(sd / "vae", VAEConfig.tiny().to_diffusers_dict(), AutoencoderKL(VAEConfig.tiny()))
    write_tiny_text_model(sd, WORDS)
    clip = make_demo_clip(root / "clip.gif", n_frames=4, size=64)
    return root, sd, clip


ARGS = ["--n-frames", "4", "--size", "64", "--device", "cpu", "--no-progress", "--timesteps", "100,700"]


def test_compare_ta_stam_end_to_end(tiny, capsys):
    root, sd, clip = tiny
    out = root / "cmp"
    main(["--model", str(sd), "--video", str(clip), "--caption", CAPTION, "--compare", "ta,stam", "--out", str(out)]
         + ARGS)
    printed = capsys.readouterr().out
    assert "down_blocks.0.attentions.0" in printed and "== comparison" in printed and "mid_block" in printed
    for name in ("diagnose.json", "diagnose.png", "diagnose.txt"):
        assert (out / name).is_file()
    with Image.open(out / "diagnose.png") as im:
        assert im.size[0] >= 700 and im.size[1] >= 500
    report = json.loads((out / "diagnose.json").read_text())
    ta, stam = report["variants"]
    assert (ta["label"], stam["label"]) == ("ta", "stam")
    assert len(ta["layers"]) == len(stam["layers"]) == 16  # SD's 16 transformer blocks (6 down, 1 mid, 9 up)
    assert set(ta["layers"][0]["per_timestep"]) == {"100", "700"}
    for layer in stam["layers"]:
        assert layer["stats"]["mu_rv_hat"] < 1e-5  # IC: the normalized input has no temporal mean
        assert layer["stats"]["mu_rv"] > 1e-3 and layer["frames"] == 4
    # untuned TA adds exactly its output bias: the same modules, rebuilt with the command's seed
    torch.manual_seed(0)
    unet = UNet.from_pretrained(sd, temporal="ta", frame_attention="ffam")
    biases = [m.attn_temp.to_out[0].bias.norm().item() for m in unet.modules() if getattr(m, "attn_temp", None)]
    for layer, b in zip(ta["layers"], biases):
        assert layer["stats"]["mean_shift"] == pytest.approx(b, rel=1e-4)
        assert layer["stats"]["cov_ratio"] == pytest.approx(1.0, abs=1e-4)
        assert layer["stats"]["mu_rv_hat"] > 1e-3  # LayerNorm leaves a temporal mean
    assert (out / "diagnose.txt").read_text().startswith("== ta")


def test_tune_steps_move_the_modules(tiny):
    root, sd, clip = tiny
    out = root / "tuned"
    main(["--model", str(sd), "--video", str(clip), "--caption", CAPTION, "--compare", "ta,stam", "--tune-steps", "2",
          "--lr", "1e-2", "--out", str(out)] + ARGS)
    ta, stam = json.loads((out / "diagnose.json").read_text())["variants"]
    assert len(ta["tune_losses"]) == 2 and ta["source"].startswith("tuned here: 2 steps")
    # a tuned TA output map is no longer zero: the added variance now depends on the input
    assert max(abs(l["stats"]["cov_ratio"] - 1) for l in ta["layers"]) > 1e-4
    assert max(l["stats"]["mu_rv_hat"] for l in stam["layers"]) < 1e-5


def test_fig4_layernorm_variants_after_tuning(tiny):
    """`ln` (Fig. 4 "LayerNorm") tunes the LayerNorm's affine with TA, so after tuning it measures differently from
    `ta`, whose affine stays frozen at its identity init; `ta` and `ln_noaffine` (Fig. 4 "LayerNorm*") compute the
    same function from the same seed, so they measure the same."""
    root, sd, clip = tiny
    out = root / "fig4"
    main(["--model", str(sd), "--video", str(clip), "--caption", CAPTION, "--compare", "ta,ln,ln_noaffine",
          "--tune-steps", "2", "--lr", "1e-2", "--out", str(out)] + ARGS)
    ta, ln, noaffine = json.loads((out / "diagnose.json").read_text())["variants"]
    assert ln["video_options"]["temporal_norm_trainable"] and not ta["video_options"]["temporal_norm_trainable"]

    def stats(v):
        return [l["stats"][k] for l in v["layers"] for k in ("mu_rv_hat", "mean_shift")]

    assert stats(ta) == pytest.approx(stats(noaffine), rel=1e-4, abs=1e-6)
    assert stats(ln) != pytest.approx(stats(ta), rel=1e-3)


def test_run_directory(tiny, capsys):
    from ei2.config import TrainConfig, save_config
    from ei2.tuned import save_tuned

    root, sd, clip = tiny
    run = root / "run"
    run.mkdir()
    save_config(TrainConfig(model=str(sd), video=str(clip), caption=CAPTION, n_frames=4, size=64,
                            output_dir=str(run)), run / "config.yaml")
    unet = UNet.from_pretrained(sd, temporal="stam")
    with torch.no_grad():  # a tuned-looking STAM: a large output bias b in every module
        for m in unet.modules():
            if getattr(m, "attn_temp", None) is not None:
                m.attn_temp.to_out[0].bias.fill_(10.0)
    save_tuned(unet, run / "tuned.safetensors", str(sd), {"steps": 3})
    main(["--run", str(run), "--device", "cpu", "--no-progress", "--timesteps", "500"])
    report = json.loads((run / "diagnose.json").read_text())
    (v,) = report["variants"]
    assert v["label"] == "run" and v["source"].startswith("tuned run")
    for layer in v["layers"]:
        d = layer["dim"]
        assert layer["stats"]["mean_shift"] == pytest.approx(10.0 * math.sqrt(d), rel=0.05)  # ||b|| dominates
    assert (run / "diagnose.png").is_file() and "tuned run" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    ([], "give --run"),
    (["--run", "/nonexistent/run"], "run directory not found"),
    (["--model", "m", "--video", "v", "--caption", "c", "--compare", "ta,bogus"], "bogus"),
    (["--model", "m", "--video", "v", "--caption", "c", "--timesteps", "100,1000"], "[0, 999]"),
])
def test_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
