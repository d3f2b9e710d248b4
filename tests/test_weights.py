"""CompVis -> diffusers key maps: against the published key table, diffusers' own key set and diffusers' converter;
the SD-folder check."""

import dataclasses

import pytest
import torch

from conftest import KEYS_TSV
from ei2.errors import Ei2Error
from ei2.unet import UNetConfig
from ei2.weights import check_sd_folder, compvis_text_key_map, compvis_unet_key_map, from_compvis

# structures beyond SD v1's: fewer/more layers, attention at other levels, three levels
VARIANTS = [
    UNetConfig.tiny(),
    dataclasses.replace(UNetConfig.tiny(), layers_per_block=1, cross_attention=(False, True, True, False),
                        block_out_channels=(32, 32, 64, 64)),
    dataclasses.replace(UNetConfig.tiny(), layers_per_block=3, cross_attention=(True, False, True),
                        block_out_channels=(32, 64, 64)),
]


def _tsv_rows(component: str) -> dict[str, str]:
    rows = {}
    for line in KEYS_TSV.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        comp, key, _shape, compvis = line.split("\t")
        if comp == component:
            rows[key] = compvis
    return rows


def test_unet_map_equals_published_table():
    table = _tsv_rows("unet")
    assert len(table) == 686
    assert compvis_unet_key_map(UNetConfig()) == table


def test_text_map_equals_published_table():
    table = _tsv_rows("text_encoder")
    assert len(table) == 196
    assert compvis_text_key_map(12) == table
    assert list(compvis_text_key_map(12)) == list(table)  # same order too


def _diffusers_unet(cfg: UNetConfig):
    diffusers = pytest.importorskip("diffusers")
    d = cfg.to_diffusers_dict()
    d.pop("_class_name")
    return diffusers.UNet2DConditionModel(**d)


@pytest.mark.parametrize("cfg", VARIANTS, ids=["tiny", "1layer-attn-middle", "3levels-3layers"])
def test_unet_map_keys_equal_diffusers_state_dict(cfg):
    key_map = compvis_unet_key_map(cfg)
    assert set(key_map) == set(_diffusers_unet(cfg).state_dict())
    assert len(set(key_map.values())) == len(key_map)  # one-to-one
    assert all(v.startswith("model.diffusion_model.") for v in key_map.values())


@pytest.mark.parametrize("cfg", VARIANTS[:2], ids=["tiny", "1layer-attn-middle"])
def test_unet_map_agrees_with_diffusers_converter(cfg):
    """diffusers' own CompVis converter, fed a checkpoint named by our map, puts every tensor where we do."""
    su = pytest.importorskip("diffusers.loaders.single_file_utils")
    key_map = compvis_unet_key_map(cfg)
    g = torch.Generator().manual_seed(0)
    ckpt = {c: torch.randn(3, generator=g) for c in key_map.values()}
    ref = su.convert_ldm_unet_checkpoint(ckpt, cfg.to_diffusers_dict())
    ours = from_compvis(ckpt, key_map, "test.ckpt")
    assert set(ref) == set(ours)
    assert all(torch.equal(ref[k], ours[k]) for k in ours)


def test_text_map_agrees_with_diffusers_converter():
    su = pytest.importorskip("diffusers.loaders.single_file_utils")
    key_map = compvis_text_key_map(2)
    ckpt = {c: torch.randn(3) for c in key_map.values()}
    ref = su.convert_ldm_clip_checkpoint(ckpt)
    ours = from_compvis(ckpt, key_map, "test.ckpt")
    assert set(ref) == set(ours) and all(torch.equal(ref[k], ours[k]) for k in ours)


def test_from_compvis_round_trip_tiny_state_dict():
    cfg = UNetConfig.tiny()
    sd = _diffusers_unet(cfg).state_dict()
    key_map = compvis_unet_key_map(cfg)
    ckpt = {key_map[k]: v for k, v in sd.items()}
    # a real single file also holds the other components, EMA copies and buffers: ignored
    ckpt["first_stage_model.decoder.conv_in.weight"] = torch.zeros(1)
    ckpt["model_ema.decay"] = torch.tensor(0.999)
    ckpt["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    out = from_compvis(ckpt, key_map, "tiny.ckpt")
    assert set(out) == set(sd)
    for k, v in sd.items():
        assert out[k].shape == v.shape and torch.equal(out[k], v)


def test_from_compvis_missing_key_names_key_and_file():
    key_map = compvis_unet_key_map(UNetConfig.tiny())
    ckpt = {c: torch.zeros(1) for c in key_map.values()}
    gone = "model.diffusion_model.output_blocks.5.2.conv.weight"
    assert gone in ckpt
    del ckpt[gone]
    with pytest.raises(Ei2Error) as e:
        from_compvis(ckpt, key_map, "/models/sd-v1-4.ckpt")
    msg = str(e.value)
    assert gone in msg and "/models/sd-v1-4.ckpt" in msg and "1 of" in msg and "\n" not in msg


def test_from_compvis_many_missing_keys_are_summarised():
    key_map = compvis_text_key_map(12)
    with pytest.raises(Ei2Error) as e:
        from_compvis({}, key_map, "empty.safetensors")
    msg = str(e.value)
    assert "196 of the 196" in msg and "empty.safetensors" in msg and msg.count("cond_stage_model") <= 5


def test_sd_folder_check_lists_every_missing_file_in_one_line(tmp_path):
    """One check for the whole SD folder (the job's and the text encoder's): every absent file, in one message."""
    root = tmp_path / "sd"
    (root / "unet").mkdir(parents=True)
    (root / "unet" / "config.json").write_text("{}")
    (root / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"")  # any listed weight name will do
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.json").write_text("{}")
    with pytest.raises(Ei2Error) as e:
        check_sd_folder(root)
    msg = str(e.value)
    assert msg.startswith(f"incomplete model folder {root}: missing vae/config.json, "
                          "vae/diffusion_pytorch_model.safetensors, text_encoder/config.json, "
                          "text_encoder/model.safetensors, tokenizer/merges.txt, tokenizer/tokenizer_config.json, "
                          "tokenizer/special_tokens_map.json;")
    assert "weights/README.md" in msg and "unet/" not in msg and "\n" not in msg
    check_sd_folder(root, ("unet",))  # only the parts asked for
    with pytest.raises(Ei2Error, match=f"model not found at {tmp_path / 'nowhere'}.*weights/README.md"):
        check_sd_folder(tmp_path / "nowhere")
    single = tmp_path / "sd-v1-4.ckpt"
    single.write_bytes(b"")
    check_sd_folder(single)  # a single file's keys are checked when it is read
