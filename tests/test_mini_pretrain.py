"""`python -m ei2.mini.pretrain --downsample 4` (issue 13): the 4x VAE and the UNet at 16x16 latents, built from the
shipped 8x configs, and the samples' latent size read off any VAE config."""

import pytest
import torch

from ei2.errors import Ei2Error
from ei2.mini import pretrain, samples, world
from ei2.unet import UNet, VideoOptions
from ei2.vae import AutoencoderKL


@pytest.mark.parametrize("downsample", pretrain.DOWNSAMPLE)
def test_configs_map_64_px_frames_to_their_latents(downsample):
    torch.manual_seed(0)
    vae_config, unet_config = pretrain.configs(downsample)
    h = world.SIZE // downsample
    vae = AutoencoderKL(vae_config).eval()
    assert samples.latent_size(vae) == unet_config.sample_size == h
    x = torch.rand(2, 3, world.SIZE, world.SIZE) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x).mean
        assert z.shape == (2, 4, h, h)
        assert vae.decode(z).shape == x.shape
        unet = UNet(unet_config, VideoOptions(**samples.IMAGE_OPTIONS)).eval()
        eps = unet(z[:, :, None], torch.tensor(500), torch.randn(2, 77, pretrain.TEXT["hidden_size"]))
    assert eps.shape == (2, 4, 1, h, h)


def test_the_shipped_configs_are_the_8x_ones():
    assert pretrain.configs(8) == (pretrain.VAE_CONFIG, pretrain.UNET_CONFIG)
    vae4, unet4 = pretrain.configs(4)
    assert vae4.block_out_channels == pretrain.VAE_CONFIG.block_out_channels[:-1]
    assert unet4.block_out_channels == (32, 64, 64) and unet4.sample_size == 16  # half width: the demo's 90 s
    with pytest.raises(Ei2Error, match="--downsample must be one of 8, 4"):
        pretrain.configs(2)
    assert pretrain.parse_args(["--downsample", "4"]).downsample == 4
