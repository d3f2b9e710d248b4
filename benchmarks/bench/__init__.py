"""`python -m benchmarks.bench` (run from the repository root): speed and memory of ei2, measured side by side with
diffusers in the same process.

Five sections, one table each (see docs/bench.md for what every row means):
  1. forward    UNet forward, ei2 `UNet` vs diffusers `UNet2DConditionModel` on the same random SD weights.
  2. train      one tuning step (forward, backward, AdamW) of the EI² video model vs diffusers frame by frame.
  3. attention  the frame attentions (self, sca, ffam r=2, ffam r=4, full) at the largest UNet level; reference = SCA.
  4. job        the whole job by ei2.pipeline's functions: VAE encode, N tuning steps, DDIM inversion, one guided
                edit with VAE decode, per phase, next to the paper's V100 figures (quoted, not measured).
  5. targets    the speed and memory targets, each next to what the run measured, with pass yes/NO.

Every table row is `| name | ei2 | ref | ratio | ... |` with ratio = ei2 / ref. Times are medians of --repeats runs
after --warmup runs (synchronized on CUDA). Peak memory, by the training job's meter `ei2.pipeline.Phase`: on CUDA
`torch.cuda.max_memory_allocated` with only the measured model on the device (absolute: weights + activations +
optimizer state); on CPU the increase of the process's peak resident set over the resident set at the start of the
measurement.

diffusers is the reference (benchmarks/diffusers_reference.py; ei2 itself never imports diffusers). Without diffusers
the reference columns read n/a.
Random weights everywhere: speed does not depend on the values, and each parameter's values are seeded by its name, so
ei2 and diffusers get identical weights without a checkpoint on disk.

Files: core.py (tables, timing, memory, settings), models.py (seeded models, the variants, the training levers
`channels_last_`, `compile_model`, `tuning_step`; the trainable set, `freeze_to_dtype_` and `make_optimizer` are the
training job's), sections.py (1-3), job.py (4-5), cli.py (options, the GPU protocol, main).
"""

from .core import Row, Settings, Table, fmt, fmt_ratio
from .models import (EI2, IMAGE, Lever, diffusers_available, init_sd_weights_, prepare_for_tuning, tuning_flops,
                     tuning_step)
from .sections import key_length

__all__ = ["EI2", "IMAGE", "Lever", "Row", "Settings", "Table", "diffusers_available", "fmt", "fmt_ratio",
           "init_sd_weights_", "key_length", "prepare_for_tuning", "tuning_flops", "tuning_step"]
