"""ei2.vae against diffusers' AutoencoderKL (the numerical oracle), on random weights saved in the real file layouts."""

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import KEYS_TSV
from ei2.errors import Ei2Error
from ei2.vae import AutoencoderKL, DiagonalGaussian, VAEConfig
from ei2.weights import compvis_vae_key_map, convert_attention_keys, load_exact, save_safetensors

diffusers = pytest.importorskip("diffusers")

WEIGHTS = "diffusion_pytorch_model.safetensors"
NEW_TO_OLD = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str, rtol: float = 1e-4) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs reference {tuple(ref.shape)}"
    scale = ref.abs().max().item()
    err = (ours.float() - ref.float()).abs().max().item()
    assert err <= rtol * scale, f"{what}: max abs diff {err:.3g} > {rtol:g} * output scale {scale:.3g}"


def reference_vae(config: VAEConfig, seed: int):
    """A diffusers AutoencoderKL with seeded random weights; norms and biases perturbed away from 1 and 0."""
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL.from_config(config.to_diffusers_dict())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def to_old_names(sd: dict) -> dict:
    """The published file's spelling of the mid-block attention (query/key/value/proj_attn)."""
    out = {}
    for k, v in sd.items():
        for new, old in NEW_TO_OLD.items():
            k = k.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        out[k] = v
    return out


def to_compvis(sd: dict, config: VAEConfig, prefix: str = "first_stage_model.") -> dict:
    """A CompVis-style state dict: CompVis names, attention projections stored as 1x1 convolutions (4-D)."""
    key_map = compvis_vae_key_map(config)
    out = {}
    for k, v in to_old_names(sd).items():
        if ".attentions." in k and v.ndim == 2:
            v = v[:, :, None, None]
        out[prefix + key_map[k][len("first_stage_model."):]] = v.clone()
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(reference model, folder in the diffusers SD layout holding it as vae/) for the tiny config."""
    root = tmp_path_factory.mktemp("sd")
    ref = reference_vae(VAEConfig.tiny(), seed=0)
    ref.save_pretrained(root / "vae", safe_serialization=True)
    return ref, root


def read_tsv_vae():
    rows = [line.rstrip("\n").split("\t") for line in KEYS_TSV.read_text().splitlines() if line.startswith("vae\t")]
    return {key: (json.loads(shape), compvis) for _, key, shape, compvis in rows}


# --- numerical parity -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tiny_parity_with_diffusers(tmp_path, seed):
    config = VAEConfig.tiny()
    ref = reference_vae(config, seed)
    ref.save_pretrained(tmp_path / "vae", safe_serialization=True)
    ours = AutoencoderKL.from_pretrained(tmp_path)
    assert ours.config == config
    # a GroupNorm eps of 1e-5 instead of 1e-6 moves outputs by only ~6e-5 of their scale here, under the tolerance
    # below, so the norms are compared directly
    for name, m in ours.named_modules():
        if isinstance(m, torch.nn.GroupNorm):
            r = ref.get_submodule(name)
            assert (m.eps, m.num_groups, m.num_channels) == (r.eps, r.num_groups, r.num_channels), name
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for h, w in [(32, 32), (40, 56)]:
            images = torch.rand(2, 3, h, w, generator=g) * 2 - 1
            post_ref, post = ref.encode(images).latent_dist, ours.encode(images)
            assert_close(post.mean, post_ref.mean, f"encode mean {h}x{w} seed {seed}")
            assert_close(post.std, post_ref.std, f"encode std {h}x{w} seed {seed}")
            assert_close(post.logvar, post_ref.logvar, f"encode logvar {h}x{w} seed {seed}")
            latents = torch.randn(2, 4, h // 8, w // 8, generator=g)
            assert_close(ours.decode(latents), ref.decode(latents).sample, f"decode {h}x{w} seed {seed}")


def test_odd_size_encode_matches_diffusers(tiny):
    # 36x44 is not a multiple of 8: the (0, 1, 0, 1) pad of the downsampler decides the latent grid
    ref, root = tiny
    ours = AutoencoderKL.from_pretrained(root)
    images = torch.rand(1, 3, 36, 44, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        mean_ref, mean = ref.encode(images).latent_dist.mean, ours.encode(images).mean
    assert_close(mean, mean_ref, "encode mean 36x44")


def test_full_sd_config_parity():
    config = VAEConfig()
    ref = reference_vae(config, seed=0)
    ours = AutoencoderKL(config)
    load_exact(ours, convert_attention_keys(ref.state_dict()), source="diffusers model")
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == 83_653_863
    g = torch.Generator().manual_seed(0)
    images = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    latents = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        post_ref, post = ref.encode(images).latent_dist, ours.encode(images)
        assert_close(post.mean, post_ref.mean, "full config encode mean")
        assert_close(post.std, post_ref.std, "full config encode std")
        assert_close(ours.decode(latents), ref.decode(latents).sample, "full config decode")


def test_full_config_keys_match_published_table():
    table = read_tsv_vae()
    assert len(table) == 248
    own = {k: list(v.shape) for k, v in AutoencoderKL(VAEConfig()).state_dict().items()}
    # the table uses the published (old) attention spelling, with linear (2-D) attention weights
    published = {k: torch.empty(shape, device="meta") for k, (shape, _) in table.items()}
    expected = {k: list(v.shape) for k, v in convert_attention_keys(published).items()}
    assert own == expected


def test_compvis_key_map_matches_published_table():
    table = read_tsv_vae()
    assert compvis_vae_key_map(VAEConfig()) == {k: compvis for k, (_, compvis) in table.items()}


# --- checkpoint spellings and layouts -------------------------------------------------------------------------------


def outputs(model: AutoencoderKL) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    images = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        return model.encode(images).mean, model.decode(torch.randn(1, 4, 4, 4, generator=g))


def assert_same_outputs(a: AutoencoderKL, b: AutoencoderKL) -> None:
    for x, y in zip(outputs(a), outputs(b)):
        assert torch.equal(x, y)


def test_old_and_new_attention_spellings_load_identically(tiny, tmp_path):
    _, root = tiny
    sd = read_sd(root / "vae" / WEIGHTS)
    assert "decoder.mid_block.attentions.0.to_q.weight" in sd  # diffusers 0.42 saves the new spelling
    old = to_old_names(sd)
    assert "encoder.mid_block.attentions.0.proj_attn.bias" in old
    write_folder(tmp_path / "old", old, root)
    assert_same_outputs(AutoencoderKL.from_pretrained(root), AutoencoderKL.from_pretrained(tmp_path / "old"))
    # the vae folder itself is accepted too
    assert_same_outputs(AutoencoderKL.from_pretrained(root / "vae"), AutoencoderKL.from_pretrained(tmp_path / "old"))


def test_both_spellings_at_once_is_an_error(tiny, tmp_path):
    _, root = tiny
    sd = read_sd(root / "vae" / WEIGHTS)
    q = sd["encoder.mid_block.attentions.0.to_q.weight"]
    both = {**sd, "encoder.mid_block.attentions.0.query.weight": q.clone()}
    write_folder(tmp_path, both, root)
    with pytest.raises(Ei2Error, match=r"both .* encoder\.mid_block\.attentions\.0\.to_q\.weight"):
        AutoencoderKL.from_pretrained(tmp_path)


@pytest.mark.parametrize("kind", ["safetensors", "ckpt", "vae-only", "diffusers-names"])
def test_single_file_checkpoints(tiny, tmp_path, kind):
    _, root = tiny
    config = VAEConfig.tiny()
    sd = read_sd(root / "vae" / WEIGHTS)
    compvis = to_compvis(sd, config)
    assert compvis["first_stage_model.decoder.mid.attn_1.q.weight"].ndim == 4
    other = {"model.diffusion_model.conv_in.weight": torch.zeros(2, 2), "cond_stage_model.transformer.x": torch.ones(1)}
    if kind == "safetensors":
        path = tmp_path / "sd.safetensors"
        save_safetensors({**compvis, **other}, path)
    elif kind == "ckpt":
        path = tmp_path / "sd.ckpt"
        torch.save({"state_dict": {**compvis, **other}, "global_step": 470000}, path)
    elif kind == "vae-only":  # a CompVis VAE file: no prefix, plus its training loss weights
        path = tmp_path / "vae.safetensors"
        save_safetensors({**to_compvis(sd, config, prefix=""), "loss.logvar": torch.zeros(())}, path)
    else:
        path = tmp_path / "vae.safetensors"
        save_safetensors(sd, path)
    loaded = AutoencoderKL.from_pretrained(path, config=config)
    assert_same_outputs(AutoencoderKL.from_pretrained(root), loaded)


def test_single_file_with_wrong_config_names_file_and_key(tiny, tmp_path):
    _, root = tiny
    path = tmp_path / "sd.safetensors"
    save_safetensors(to_compvis(read_sd(root / "vae" / WEIGHTS), VAEConfig.tiny()), path)
    message = r"sd\.safetensors does not match .*decoder\.conv_in\.weight: file \(64, 4, 3, 3\) vs model \(512, 4, 3, 3"
    with pytest.raises(Ei2Error, match=message):
        AutoencoderKL.from_pretrained(path)  # SD v1-4 config by default


def test_dtype_and_inference_mode(tiny):
    _, root = tiny
    model = AutoencoderKL.from_pretrained(root, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in model.parameters())
    assert not model.training
    out = model.decode(torch.randn(1, 4, 4, 4))  # float32 latents are cast to the model's dtype
    assert out.dtype == torch.bfloat16 and out.shape == (1, 3, 32, 32)


# --- bad input ------------------------------------------------------------------------------------------------------


def read_sd(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def write_folder(root: Path, sd: dict, like: Path) -> Path:
    (root / "vae").mkdir(parents=True, exist_ok=True)
    (root / "vae" / "config.json").write_text((like / "vae" / "config.json").read_text())
    save_safetensors(sd, root / "vae" / WEIGHTS)
    return root


def test_missing_folder(tmp_path):
    with pytest.raises(Ei2Error, match=re.escape(f"model not found at {tmp_path / 'nowhere'}")):
        AutoencoderKL.from_pretrained(tmp_path / "nowhere")


def test_missing_weight_file(tiny, tmp_path):
    _, root = tiny
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text((root / "vae" / "config.json").read_text())
    with pytest.raises(Ei2Error, match=re.escape(f"no vae weights in {tmp_path}")):
        AutoencoderKL.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda sd: sd.update({"encoder.conv_in.weight": torch.zeros(16, 3, 5, 5)}),
         r"1 wrong shape: encoder\.conv_in\.weight: file \(16, 3, 5, 5\) vs model \(16, 3, 3, 3\)"),
        (lambda sd: sd.pop("decoder.up_blocks.1.resnets.2.conv2.bias"),
         r"1 missing: decoder\.up_blocks\.1\.resnets\.2\.conv2\.bias"),
        (lambda sd: sd.update({"decoder.extra.weight": torch.zeros(1)}), r"1 unexpected: decoder\.extra\.weight"),
    ],
    ids=["wrong-shape", "missing-key", "extra-key"],
)
def test_mismatched_weights_name_file_and_key(tiny, tmp_path, change, message):
    _, root = tiny
    sd = read_sd(root / "vae" / WEIGHTS)
    change(sd)
    write_folder(tmp_path, sd, root)
    with pytest.raises(Ei2Error, match=re.escape(str(tmp_path / "vae" / WEIGHTS)) + r" does not match .*" + message):
        AutoencoderKL.from_pretrained(tmp_path)


def test_truncated_safetensors(tiny, tmp_path):
    _, root = tiny
    write_folder(tmp_path, read_sd(root / "vae" / WEIGHTS), root)
    path = tmp_path / "vae" / WEIGHTS
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(Ei2Error, match=re.escape(str(path)) + " is not a readable safetensors file"):
        AutoencoderKL.from_pretrained(tmp_path)


def test_single_file_without_vae(tmp_path):
    path = tmp_path / "unet-only.safetensors"
    save_safetensors({"model.diffusion_model.conv_in.weight": torch.zeros(2)}, path)
    with pytest.raises(Ei2Error, match=r"unet-only\.safetensors holds no VAE weights"):
        AutoencoderKL.from_pretrained(path)


def test_unsupported_config(tiny, tmp_path):
    _, root = tiny
    write_folder(tmp_path, read_sd(root / "vae" / WEIGHTS), root)
    cfg = json.loads((tmp_path / "vae" / "config.json").read_text())
    cfg["mid_block_add_attention"] = False
    (tmp_path / "vae" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Ei2Error, match="mid_block_add_attention"):
        AutoencoderKL.from_pretrained(tmp_path)


def test_config_round_trip():
    d = {**VAEConfig.tiny().to_diffusers_dict(), "force_upcast": True, "_diffusers_version": "0.42.1"}
    assert VAEConfig.from_dict(d) == VAEConfig.tiny()
    assert VAEConfig.from_dict({}) == VAEConfig()


# --- posterior and the scaled-latent conveniences -------------------------------------------------------------------


def test_posterior_sample_uses_the_generator():
    params = torch.randn(2, 8, 5, 6, generator=torch.Generator().manual_seed(0))
    post = DiagonalGaussian(params)
    sample = post.sample(torch.Generator().manual_seed(42))
    noise = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(42))
    assert torch.equal(sample, post.mean + post.std * noise)
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    assert torch.equal(sample, DiagonalGaussianDistribution(params).sample(torch.Generator().manual_seed(42)))


def test_posterior_clamps_logvar():
    params = torch.cat([torch.zeros(1, 4, 2, 2), torch.full((1, 2, 2, 2), 100.0), torch.full((1, 2, 2, 2), -100.0)], 1)
    post = DiagonalGaussian(params)
    assert post.logvar.max().item() == 20.0 and post.logvar.min().item() == -30.0
    assert torch.isfinite(post.std).all()


def test_scaled_latent_conveniences(tiny):
    _, root = tiny
    model = AutoencoderKL.from_pretrained(root)
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        post = model.encode(images)
        assert torch.equal(model.encode_latents(images, sample=False), post.mean * 0.18215)
        z = model.encode_latents(images, generator=torch.Generator().manual_seed(5))
        assert torch.equal(z, post.sample(torch.Generator().manual_seed(5)) * 0.18215)
        assert torch.equal(model.decode_latents(z), model.decode(z / 0.18215))
