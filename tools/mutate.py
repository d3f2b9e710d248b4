"""Mutation check of the paper-equation tests (issue 11; not part of CI).

For each mutation below (a file, exact snippets of its current text, their replacements, and the tests that must catch
it) this copies the repository to a temporary folder, applies that one mutation there, and runs the named tests in
the copy:

    PYTHONPATH=<copy> OMP_NUM_THREADS=1 python -m pytest -q -x -p no:cacheprovider <tests>

A mutation is *caught* when pytest reports failing tests (exit status 1) and *survives* when they pass (0). Any other
status (a test id that no longer exists, a collection error) is an *error*. First the unmutated copy must pass every
named test (the baseline), otherwise "caught" would mean nothing. A snippet that is not found exactly once in its file
is an error too, so the list cannot silently rot when the code changes: update the snippet.

    python tools/mutate.py                 # every mutation, a table at the end; exit status 1 if any survives/errs
    python tools/mutate.py --list          # the mutations and their tests
    python tools/mutate.py -k ffam sca     # only mutations whose name contains one of these words
    python tools/mutate.py --each          # without -x: report which of the named tests fail for each mutation
    python tools/mutate.py --check         # only check that every snippet still applies (no tests run)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", "runs", "*.egg-info", ".venv")

EQ = "tests/test_equations.py::"
MOD = "tests/test_modules.py::"
UNET = "tests/test_unet.py::"
DDIM = "tests/test_ddim.py::"


@dataclass
class Mutation:
    name: str
    file: str
    edits: list[tuple[str, str]]  # (exact original snippet, replacement), each snippet found exactly once
    tests: list[str]  # pytest node ids, the most specific first (-x stops at the first failure)
    what: str = ""


SCH = "tests/test_schedule.py::"
MUTATIONS = [
    # --- Eq. 6: Instance Centering
    Mutation("ic_axis_channels", "ei2/attention.py",
             [("    return z - z.mean(dim=-2, keepdim=True)\n", "    return z - z.mean(dim=-1, keepdim=True)\n")],
             [MOD + "test_instance_centering_eq6", EQ + "test_stam_in_block_equals_naive_loop_eq9"],
             "IC centers over channels instead of the n frames"),
    Mutation("ic_skipped_in_block", "ei2/unet.py",
             [("z = z + self.attn_temp(self.norm_temp(z))", "z = z + self.attn_temp(z)")],
             [EQ + "test_stam_in_block_equals_naive_loop_eq9"],
             "the block feeds z, not IC(z), to STAM's attention"),
    # --- Eq. 9: STAM's grouping inside the transformer block
    Mutation("stam_over_tokens_of_a_frame", "ei2/unet.py",
             [("z = x.view(bn // n, n, l, d).transpose(1, 2).reshape(-1, n, d).contiguous()",
               "z = x.reshape(bn, l, d).contiguous()"),
              ("x = z.view(bn // n, l, n, d).transpose(1, 2).reshape(bn, l, d)", "x = z.reshape(bn, l, d)")],
             [EQ + "test_stam_in_block_equals_naive_loop_eq9"],
             "STAM attends over the l tokens of one frame instead of the n frames of one location"),
    Mutation("stam_groups_mix_videos", "ei2/unet.py",
             [("z = x.view(bn // n, n, l, d).transpose(1, 2).reshape(-1, n, d).contiguous()",
               "z = x.view(n, bn // n, l, d).transpose(0, 1).transpose(1, 2).reshape(-1, n, d).contiguous()"),
              ("x = z.view(bn // n, l, n, d).transpose(1, 2).reshape(bn, l, d)",
               "x = z.view(bn // n, l, n, d).transpose(1, 2).transpose(0, 1).reshape(bn, l, d)")],
             [EQ + "test_stam_in_block_equals_naive_loop_eq9"],
             "(b*n) read as (n, b): a sequence takes frames of several videos (the identity when b = 1)"),
    Mutation("temporal_heads_fixed_8", "ei2/unet.py",
             [("temporal_module(video.temporal, dim, heads, video.temporal_norm,",
               "temporal_module(video.temporal, dim, 8, video.temporal_norm,")],
             [EQ + "test_stam_in_block_equals_naive_loop_eq9", MOD + "test_temporal_heads_follow_the_config"],
             "the temporal attention's heads ignore the level's head count (config)"),
    # --- Eq. 8: spectral norm
    Mutation("sn_dropped_in_W_v", "ei2/attention.py",
             [("self.to_v = SpectralNormLinear(dim, dim, bias=False)", "self.to_v = nn.Linear(dim, dim, bias=False)")],
             [EQ + "test_stam_in_block_equals_naive_loop_eq9",
              EQ + "test_eq7_covariance_bound_holds_with_spectral_norm_and_breaks_without"],
             "STAM's W_v is a plain Linear"),
    Mutation("sn_dropped_in_W_L", "ei2/attention.py",
             [("self.to_out = nn.ModuleList([SpectralNormLinear(dim, dim)])",
               "self.to_out = nn.ModuleList([nn.Linear(dim, dim)])")],
             [EQ + "test_stam_in_block_equals_naive_loop_eq9",
              EQ + "test_eq7_covariance_bound_holds_with_spectral_norm_and_breaks_without"],
             "STAM's W_L is a plain Linear"),
    Mutation("sn_forward_uses_raw_W", "ei2/attention.py",
             [("return F.linear(x, self.normalized_weight(), self.bias)", "return F.linear(x, self.weight, self.bias)")],
             [EQ + "test_eq7_covariance_bound_holds_with_spectral_norm_and_breaks_without",
              EQ + "test_stam_in_block_equals_naive_loop_eq9"],
             "SpectralNormLinear.forward multiplies by W instead of W / sigma"),
    Mutation("sn_sigma_detached", "ei2/attention.py",
             [("return self.weight / self.sigma().to(self.weight.dtype)",
               "return self.weight / self.sigma().detach().to(self.weight.dtype)")],
             [EQ + "test_unet_spectral_norm_gradient_through_sigma",
              MOD + "test_spectral_norm_gradient_flows_through_sigma"],
             "sigma carries no gradient"),
    Mutation("power_iteration_not_run_in_unet", "ei2/unet.py",
             [("m.power_iteration(1)", "m.power_iteration(0)")],
             [EQ + "test_unet_training_forward_iterates_each_spectral_norm_once"],
             "UNet.forward's training loop does not iterate u, v"),
    Mutation("power_iteration_also_in_eval", "ei2/unet.py",
             [("        if self.training:\n            for m in self.spectral_norms:",
               "        if True:\n            for m in self.spectral_norms:")],
             [EQ + "test_unet_training_forward_iterates_each_spectral_norm_once"],
             "the UNet iterates u, v in eval too"),
    Mutation("power_iteration_twice_per_forward", "ei2/unet.py",
             [("            m.iterate_in_forward = False", "            m.iterate_in_forward = True")],
             [EQ + "test_unet_training_forward_iterates_each_spectral_norm_once"],
             "the modules iterate again in their own forward: two iterations per training forward"),
    # --- Eq. 10: FFAM
    Mutation("ffam_others_include_frame_i", "ei2/attention.py",
             [("others = k + (k >= torch.arange(n, device=z.device)[:, None])",
               "others = k + (k > torch.arange(n, device=z.device)[:, None])")],
             [MOD + "test_fine_coarse_context_layout_by_hand", MOD + "test_ffam_equals_naive_loop"],
             "frame i's coarse keys include frame i and miss frame i+1"),
    Mutation("ffam_stride_fixed_2", "ei2/attention.py",
             [("coarse = z[:, :, ::r, ::r]", "coarse = z[:, :, ::2, ::2]")],
             [MOD + "test_ffam_equals_naive_loop", MOD + "test_ffam_key_length"],
             "the other frames are downsampled with stride 2 whatever r"),
    # --- Tune-A-Video's SCA
    Mutation("sca_previous_is_i", "ei2/attention.py",
             [("previous = (torch.arange(n, device=z.device) - 1).clamp(min=0)",
               "previous = torch.arange(n, device=z.device)")],
             [MOD + "test_sca_keys_by_hand", EQ + "test_sca_frame_attention_equals_naive_loop"],
             "SCA's second key frame is frame i, not i-1"),
    Mutation("sca_frame_0_dropped", "ei2/attention.py",
             [("return torch.cat([z[:, [0] * n], z[:, previous]], dim=2)",
               "return torch.cat([z[:, previous], z[:, previous]], dim=2)")],
             [MOD + "test_sca_keys_by_hand", EQ + "test_sca_frame_attention_equals_naive_loop"],
             "SCA's first key frame is frame i-1, not frame 0"),
    # --- Section 5: the trainable set
    Mutation("trainable_drops_attn2_q", "ei2/unet.py",
             [('name.endswith(("attn1.to_q.weight", "attn2.to_q.weight"))', 'name.endswith(("attn1.to_q.weight",))')],
             [EQ + "test_trainable_set_tiny_by_name", MOD + "test_trainable_set_full_sd[stam]"],
             "cross-attention's W_Q is frozen"),
    Mutation("trainable_adds_norm1", "ei2/unet.py",
             [('name.endswith(("attn1.to_q.weight", "attn2.to_q.weight"))',
               'name.endswith(("attn1.to_q.weight", "attn2.to_q.weight", "norm1.weight"))')],
             [EQ + "test_trainable_set_tiny_by_name", MOD + "test_trainable_set_full_sd[stam]"],
             "norm weights join the trainable set"),
    # --- DDIM and the schedule (Eq. 1, 2)
    Mutation("ddim_linear_betas", "ei2/ddim.py",
             [("betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2",
               "betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)")],
             [EQ + "test_tune_steps_is_eq2", "tests/test_ddim.py::test_alphas_cumprod_identical_to_diffusers"],
             "beta schedule linear instead of scaled-linear"),
    Mutation("ddim_sample_prev_off_by_one", "ei2/ddim.py",
             [("x = step(eps, t, t - ratio, x, alphas, eta=eta, generator=generator)",
               "x = step(eps, t, t - ratio + 1, x, alphas, eta=eta, generator=generator)")],
             ["tests/test_ddim.py::test_guided_sampling_matches_diffusers_loop"],
             "sampling's previous timestep is t - ratio + 1"),
    Mutation("ddim_invert_prev_off_by_one", "ei2/ddim.py",
             [("x = _ddim(x, eps, _at(alphas, t - ratio), alphas[t])",
               "x = _ddim(x, eps, _at(alphas, t - ratio + 1), alphas[t])")],
             ["tests/test_ddim.py::test_inversion_matches_tune_a_video"],
             "inversion's lower timestep is t - ratio + 1"),
    # --- Eq. 2: tune_steps
    Mutation("latent_scale_dropped", "ei2/pipeline.py",
             [("x0 = to_video(posterior.sample(generator).float() * scale)",
               "x0 = to_video(posterior.sample(generator).float())")],
             [EQ + "test_tune_steps_is_eq2"],
             "x_0 is the VAE latent without the 0.18215 scale"),
    Mutation("t_range_0_10", "ei2/pipeline.py",
             [("t = torch.randint(0, len(alphas), (1,), generator=generator, device=device)",
               "t = torch.randint(0, 10, (1,), generator=generator, device=device)")],
             [EQ + "test_tune_steps_is_eq2"],
             "t drawn from [0, 10) instead of [0, 1000)"),
    Mutation("loss_target_x0", "ei2/pipeline.py",
             [("loss = F.mse_loss(pred.float(), noise)", "loss = F.mse_loss(pred.float(), x0)")],
             [EQ + "test_tune_steps_is_eq2"],
             "the regression target is x_0, not the noise eps"),
    Mutation("draw_order_t_before_noise", "ei2/pipeline.py",
             [("        noise = torch.randn(x0.shape, generator=generator, device=device)\n"
               "        t = torch.randint(0, len(alphas), (1,), generator=generator, device=device)\n",
               "        t = torch.randint(0, len(alphas), (1,), generator=generator, device=device)\n"
               "        noise = torch.randn(x0.shape, generator=generator, device=device)\n")],
             [EQ + "test_tune_steps_is_eq2"],
             "t drawn before the noise (changes every run's random stream)"),
    # --- Section 4.1: GroupNorm over frames
    Mutation("resnet_groupnorm_per_frame", "ei2/unet.py",
             [("        if n == 1 or not self.video:\n", "        if True:\n")],
             ["tests/test_unet.py::test_resnet_norm_over_frames", EQ + "test_unet_group_norms_pool_frames[video]",
              UNET + "test_conv_norm_out_over_frames_by_hand"],
             "VideoGroupNorm ignores the frames (per-frame statistics)"),
    Mutation("conv_norm_out_ignores_resnet_norm", "ei2/unet.py",
             [('VideoGroupNorm(groups, ch[0], c.norm_eps, video.resnet_norm == "video")',
               'VideoGroupNorm(groups, ch[0], c.norm_eps, True)')],
             [EQ + "test_unet_group_norms_pool_frames[frame]", UNET + "test_unet_output_norm_statistics[frame]"],
             "conv_norm_out pools frames even with resnet_norm: frame"),
    Mutation("conv_norm_out_per_frame", "ei2/unet.py",
             [("self.conv_norm_out(x, n)", "self.conv_norm_out(x, 1)")],
             [EQ + "test_unet_group_norms_pool_frames[video]", UNET + "test_unet_output_norm_statistics[video]"],
             "conv_norm_out normalizes each frame alone"),
    # --- Eq. 3: the attention scale
    Mutation("attention_scale_1", "ei2/attention.py",
             [("out = F.scaled_dot_product_attention(q, k, v)", "out = F.scaled_dot_product_attention(q, k, v, scale=1.0)")],
             [EQ + "test_proposition_1_i_monte_carlo_through_attention",
              EQ + "test_stam_in_block_equals_naive_loop_eq9", UNET + "test_tiny_parity_with_diffusers"],
             "softmax(Q K^T) V without 1/sqrt(d)"),
    # --- Eq. 1, 2: the DDIM step, guidance, the forward process
    Mutation("ddim_step_direction_a_t", "ei2/ddim.py",
             [("direction = (1 - a_to - sigma**2) ** 0.5 * eps", "direction = (1 - a_t - sigma**2) ** 0.5 * eps")],
             [DDIM + "test_step_matches_diffusers"],
             "the direction pointing to x_t uses a_t instead of a_prev"),
    Mutation("guidance_from_cond", "ei2/ddim.py",
             [("return eps_u + guidance * (eps_c - eps_u)", "return eps_c + guidance * (eps_c - eps_u)")],
             [DDIM + "test_guided_sampling_matches_diffusers_loop"],
             "classifier-free guidance extrapolates from the conditional prediction"),
    Mutation("add_noise_without_sqrt", "ei2/ddim.py",
             [("return a**0.5 * x0 + (1 - a) ** 0.5 * noise", "return a * x0 + (1 - a) ** 0.5 * noise")],
             [DDIM + "test_add_noise_matches_diffusers", EQ + "test_tune_steps_is_eq2"],
             "q(x_t | x_0) with a_t instead of sqrt(a_t)"),
    # --- Eq. 4: the transformer block
    Mutation("cross_attention_reads_norm1", "ei2/unet.py",
             [("x = x + self.attn2(self.norm2(x), context)", "x = x + self.attn2(self.norm1(x), context)")],
             [UNET + "test_tiny_parity_with_diffusers"],
             "cross-attention normalizes with the self-attention's LayerNorm"),
    # --- Eq. 6 in half precision
    Mutation("ic_in_low_precision", "ei2/attention.py",
             [("        z32 = z.float()\n", "        z32 = z\n")],
             [MOD + "test_instance_centering_in_bf16_autocast"],
             "IC centers a bf16 stream in bf16"),
    # --- Eq. 9 / Prop. 1 (ii): STAM's bias starts at zero, so the module starts as the identity on the mean
    Mutation("stam_bias_random_init", "ei2/attention.py",
             [("zero_out_bias=(kind == \"stam\")", "zero_out_bias=False")],
             [MOD + "test_inflated_unet_one_frame_equals_image_sd"],
             "STAM's output bias b keeps nn.Linear's random init"),
    Mutation("stam_normalized_by_layernorm", "ei2/attention.py",
             [('norm = norm or ("ic" if kind == "stam" else "layernorm")', 'norm = norm or "layernorm"')],
             [MOD + "test_layernorm_ta_shifts_the_mean_where_stam_does_not"],
             "STAM normalizes with LayerNorm (over channels) instead of Instance Centering (over frames)"),
    # --- Eq. 8: sigma converged when the layer is made
    Mutation("sn_not_converged_at_creation", "ei2/attention.py",
             [("        self.converge()\n", "")],
             [MOD + "test_spectral_norm_converged_at_creation"],
             "u, v start random: the first steps divide by a wrong sigma"),
    # --- Eq. 10: full attention (r = 1)
    Mutation("full_attention_per_frame", "ei2/attention.py",
             [("q, k, v = (t.reshape(b, n * l, d) for t in (q, k, v))",
               "q, k, v = (t.reshape(b * n, l, d) for t in (q, k, v))")],
             [MOD + "test_ffam_r1_is_full_attention"],
             "'full' attends within each frame only"),
    # --- Section 4.1: pseudo-3D, frames travel as a batch of images
    Mutation("frames_to_batch_mixes_channels", "ei2/unet.py",
             [("x = sample.transpose(1, 2).reshape(b * n, -1, h, w)", "x = sample.reshape(b * n, -1, h, w)")],
             [UNET + "test_pseudo_3d_is_per_frame"],
             "(b, c, n, h, w) -> (b*n, c, h, w) without moving the frame axis: channels and frames mix"),
    # --- Section 5: the trainable set with the temporal norm's affine (Fig. 4 "LayerNorm")
    Mutation("temporal_norm_trainable_ignored", "ei2/unet.py",
             [("or (temporal_norm and \".norm_temp.\" in name))", "or (False and \".norm_temp.\" in name))")],
             [MOD + "test_trainable_set_with_the_temporal_norm"],
             "the option temporal_norm_trainable adds nothing to the trainable set"),
    # --- the model's DDIM schedule (issue 13): SNR'(t) = shift SNR(t), read from the folder, used by every step
    Mutation("snr_shift_wrong", "ei2/ddim.py",
             [("return shift * alphas / (1 - alphas + shift * alphas)", "return shift * alphas / (1 + shift * alphas)")],
             [SCH + "test_snr_shifted_multiplies_the_snr_at_every_t"], "the shifted alpha misses the 1 - a term"),
    Mutation("betas_off_by_one", "ei2/ddim.py",
             [("return 1 - alphas / torch.cat([alphas.new_ones(1), alphas[:-1]])", "return 1 - alphas[1:] / alphas[:-1]")],
             [SCH + "test_betas_of_inverts_the_cumulative_product"], "betas lose the first step"),
    Mutation("trained_betas_ignored", "ei2/ddim.py",
             [('    if config.get("trained_betas") is not None:', '    if False:')],
             [SCH + "test_schedule_equals_diffusers_from_the_same_config"], "a stored schedule is read as SD's"),
    Mutation("prediction_type_unchecked", "ei2/ddim.py",
             [('for key, value in {"num_train_timesteps": 1000, "prediction_type": "epsilon"}.items():',
               'for key, value in {"num_train_timesteps": 1000}.items():')],
             [SCH + "test_read_schedule_refuses_what_ei2_does_not_implement"], "v-prediction models accepted"),
    Mutation("folder_schedule_ignored", "ei2/weights.py",
             [("        return ddim.schedule(read_json(file))", "        return None")],
             [SCH + "test_read_schedule_from_a_model_folder", SCH + "test_the_job_uses_the_model_folders_schedule"],
             "the folder's schedule is not read"),
    Mutation("inversion_with_sd_schedule", "ei2/pipeline.py",
             [("alphas=models.alphas).float()", ").float()")],
             [SCH + "test_the_job_uses_the_model_folders_schedule"], "inversion ignores the model's schedule"),
    Mutation("render_with_sd_schedule", "ei2/pipeline.py",
             [("guidance=guidance, progress=progress, alphas=models.alphas)", "guidance=guidance, progress=progress)")],
             [SCH + "test_the_job_uses_the_model_folders_schedule"], "rendering ignores the model's schedule"),
    Mutation("tuning_with_sd_schedule", "ei2/pipeline.py",
             [("alphas = (ddim.alphas_cumprod() if models.alphas is None else models.alphas).to(device)",
               "alphas = ddim.alphas_cumprod().to(device)")],
             [SCH + "test_the_job_uses_the_model_folders_schedule"], "tuning's x_t ignores the model's schedule"),
    Mutation("inversion_prompt_ignored", "ei2/config.py",
             [("return caption if inversion_prompt == \"caption\" else \"\"", "return \"\"")],
             ["tests/test_train.py::test_inversion_prompt_caption_inverts_with_the_caption"],
             "inversion_prompt: caption inverts with \"\""),
    Mutation("inversion_prompt_unused", "ei2/pipeline.py",
             [("context = models.text.encode([prompt])\n    with models.autocast():\n        return ddim.invert",
               "context = models.text.encode([\"\"])\n    with models.autocast():\n        return ddim.invert")],
             ["tests/test_train.py::test_inversion_prompt_caption_inverts_with_the_caption"],
             "pipeline.invert ignores its prompt"),
]


def cited_tests() -> set[str]:
    """The test functions that README's "The paper in the code" table cites (its last column)."""
    text = (ROOT / "README.md").read_text()
    table = text.split("## The paper in the code", 1)[1].split("\n\n", 2)[1]
    return {name for line in table.splitlines() if line.startswith("|")
            for name in re.findall(r"\[`(test_\w+)`\]", line.rsplit("|", 2)[-2])}


def uncovered(mutations: list[Mutation]) -> list[str]:
    """Cited tests that no mutation names: nothing shows they fail when their line breaks."""
    named = {t.split("::")[-1].split("[")[0] for m in mutations for t in m.tests}
    return sorted(cited_tests() - named)


def copy_repo(dst: Path) -> None:
    shutil.copytree(ROOT, dst, ignore=IGNORE, symlinks=True)


def apply(root: Path, m: Mutation) -> str | None:
    """Apply m in root; None, or why it cannot be applied (a snippet missing or ambiguous)."""
    path = root / m.file
    text = path.read_text()
    for old, new in m.edits:
        count = text.count(old)
        if count != 1:
            return f"snippet found {count} times in {m.file}: {old.strip()[:70]!r}"
        text = text.replace(old, new)
    path.write_text(text)
    return None


def run_tests(root: Path, tests: list[str], stop_first: bool) -> tuple[int, list[str], str]:
    """pytest in the copy; (exit status, failed node ids, output tail)."""
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE"] + (["-x"] if stop_first else [])
    proc = subprocess.run(cmd + tests, cwd=root, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, flags=re.M)
    return proc.returncode, failed, "\n".join(out.splitlines()[-15:])


def check_imports_copy(root: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1")
    where = subprocess.run([sys.executable, "-c", "import ei2; print(ei2.__file__)"], cwd=root, env=env,
                           capture_output=True, text=True).stdout.strip()
    if not where.startswith(str(root)):
        sys.exit(f"the copy's ei2 is not the one imported (got {where!r}); check the editable install / PYTHONPATH")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", nargs="*", default=None, help="only mutations whose name contains one of these words")
    ap.add_argument("--list", action="store_true", help="print the mutations and exit")
    ap.add_argument("--each", action="store_true", help="run every named test (no -x) and report which fail")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    ap.add_argument("--check", action="store_true", help="only check that every snippet is found exactly once")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.k or any(w in m.name for w in args.k)]
    if args.list:
        for m in chosen:
            print(f"{m.name} ({m.file}): {m.what}\n    " + "\n    ".join(m.tests))
        return 0
    rows, bad = [], 0
    missing = uncovered(MUTATIONS)
    if missing:
        print(f"README cites tests that no mutation checks: {', '.join(missing)}", flush=True)
        bad += 1
    with tempfile.TemporaryDirectory(prefix="ei2-mutate-") as tmp:
        tmp = Path(tmp)
        # snippets are checked up front against the working tree, so a stale list fails before any test runs
        for m in chosen:
            probe = tmp / "probe"
            (probe / m.file).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / m.file, probe / m.file)
            why = apply(probe, m)
            shutil.rmtree(probe)
            if why:
                rows.append((m.name, m.tests, f"ERROR: {why}"))
                bad += 1
        if bad or args.check:
            stale = sum(1 for r in rows if r[2].startswith("ERROR"))
            print(f"snippets: {len(chosen) - stale} of {len(chosen)} mutations apply", flush=True)
            chosen = []
        if chosen and not args.no_baseline:
            base = tmp / "baseline"
            copy_repo(base)
            check_imports_copy(base)
            tests = list(dict.fromkeys(t for m in chosen for t in m.tests))
            t0 = time.time()
            rc, failed, tail = run_tests(base, tests, stop_first=False)
            shutil.rmtree(base)
            print(f"baseline: {len(tests)} tests, exit {rc}, {time.time() - t0:.0f} s", flush=True)
            if rc != 0:
                print(tail)
                rows.append(("(baseline, unmutated)", tests, f"ERROR: exit {rc}, failing {failed}"))
                bad += 1
                chosen = []
        for m in chosen:
            work = tmp / m.name
            copy_repo(work)
            apply(work, m)
            t0 = time.time()
            rc, failed, tail = run_tests(work, m.tests, stop_first=not args.each)
            shutil.rmtree(work)
            if rc == 1:
                verdict = "caught" + (f" ({len(failed)} failing)" if args.each else "")
            elif rc == 0:
                verdict, bad = "SURVIVED", bad + 1
            else:
                verdict, bad = f"ERROR: pytest exit {rc}", bad + 1
                print(tail)
            rows.append((m.name, m.tests, verdict))
            print(f"{m.name}: {verdict} ({time.time() - t0:.0f} s)" + (f" {failed}" if args.each else ""), flush=True)
    if not rows:
        return 1 if bad else 0
    width = max(len(r[0]) for r in rows)
    print()
    print(f"{'mutation':<{width}} | tests | caught/survived")
    print(f"{'-' * width}-|-------|----------------")
    for name, tests, verdict in rows:
        short = ", ".join(t.split("::")[-1] for t in tests)
        print(f"{name:<{width}} | {short} | {verdict}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
