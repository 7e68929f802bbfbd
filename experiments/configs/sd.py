"""TMPQ-DM's text-to-image setting on a local Stable Diffusion 1.x/2.x diffusers folder, for a TPU VM or a GPU.

4 DDIM steps (quad groups), bits {8,7,6,5}, W6A6 budget, classifier-free guidance 7.5 (both UNet passes counted in
BitOPs), prompts from a text file encoded once with the folder's CLIP text encoder (or --config.prompt_embeds).
Fitness: paired distance to the FP teacher (50 guided DDIM steps; no dataset needed). Reports: the same on held-out
noise, plus FID when you give reference statistics:

    python experiments/search.py --config experiments/configs/sd.py \
        --config.model_dir=PATH/stable-diffusion-v1-5 --workdir runs/sd
    # with FID against your own statistics (e.g. `python experiments/fid.py stats --images coco_val.npz ...`):
    ... --config.report_metrics="('teacher_mse', 'inception_fid')" --config.fid_reference=coco_val_stats.npz
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import paper  # noqa: E402

PROMPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "prompts", "smoke.txt")


def get_config():
    c = paper.get_config()  # the reference algorithm: population 50, 20 generations, top-10, 25 mut., 10 cross.
    # model: a downloaded diffusers pipeline folder (unet/, vae/, scheduler/, text_encoder/, tokenizer/)
    c.model = "sd"
    c.model_dir = ""  # required: --config.model_dir=PATH
    c.checkpoint = ""
    c.prompts_file = PROMPTS  # a small committed list for smoke runs; use your own
    c.guidance_scale = 7.5
    c.memory_efficient_attention = True  # chunked attention: no (4096 x 4096) score tensors at 64x64 latents
    c.matmul_precision = "highest"  # FP teacher and calibration in fp32 (TPU default would be bf16 passes)
    # space and budget: 4 steps, bits {8,7,6,5}, W6A6
    c.num_steps = 4
    c.bit_choices = (8, 7, 6, 5)
    c.budget_bits = 6
    # fitness and reports (DESIGN.md Sec. 5): paired teacher distances need no dataset
    c.metric = "teacher_mse"
    c.fitness_reference = ""
    c.search_samples = 32
    c.select_samples = 64
    c.rescore_top_k = 5
    c.report_metrics = ("teacher_mse",)
    c.fid_reference = ""  # reference statistics .npz for inception_fid in report_metrics
    c.report_reference = c.get_ref("fid_reference")
    c.final_samples = 256
    c.fid_batch = 50
    c.reference_steps = 50
    # calibration in bounded batches
    c.calib_steps = 20
    c.calib_samples = 32
    c.calib_batch = 8
    c.sample_batch = 16
    return c
