"""The embedded default: search timesteps and per-site bits for the committed mnist-small UNet on 2 CPU cores.

The final candidates are reported on held-out noise against the 500 held-out digits, with the classifier FD and
standard Inception FID (needs `python experiments/fid.py fetch-weights` once).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # model
    c.model = "mnist-small"  # an embedded model, or a family ('unet2d') with model_dir
    c.checkpoint = "checkpoints/mnist-small/ema_params.msgpack"
    c.model_dir = ""  # a local diffusers folder (e.g. google/ddpm-cifar10-32); then `checkpoint` is unused
    c.seed = 0
    c.multihost = False
    # text-to-image models (model='sd' with model_dir of a Stable Diffusion folder); see configs/sd.py
    c.prompts_file = ""  # one prompt per line; sample i uses prompt i % P
    c.prompt_embeds = ""  # or precomputed embeddings (.npz: prompt_embeds, negative_prompt_embeds)
    c.negative_prompt = ""  # the unconditional text of classifier-free guidance
    c.guidance_scale = 1.0  # > 1: two UNet passes per step, both counted in BitOPs
    c.memory_efficient_attention = False  # diffusers' chunked attention path (same sites and outputs)
    c.split_head_dim = False
    c.matmul_precision = "highest"  # of every matmul (FP reference, calibration, candidates); TPU default is bf16
    # search space
    c.num_steps = 10
    c.spacing = "quad"  # 'quad' | 'uniform' | 'custom' (then group_starts)
    c.group_starts = ()  # tuples, so that --config.bit_choices="(8, 6, 4)" works on the command line
    c.bit_choices = (8, 7, 6, 5)
    c.seed_bits = 6
    c.probs_8bit = True  # attention probabilities at 8 bits, as in the reference code
    # the first and last layer (conv_in reads x_t, conv_out writes the prediction) at 8-bit weights and activations,
    # as in BRECQ-style PTQ code; 0: searched like the others. 6-bit activations at conv_in alone cost as much as
    # everywhere (README "Calibration"); the pins are in every candidate's BitOPs and in the budget
    c.first_last_bits = 8
    c.rules = []  # e.g. [dict(pattern="conv_in$", w_bits=8, a_bits=8)]
    # budget (exact integer BitOPs per image, all sampling steps)
    c.budget_bits = 6  # uniform W6A6 at num_steps ...
    c.budget_bitops = 0  # ... unless an explicit BitOPs budget is given
    # algorithm
    # 'local' (below): the search of issue 17 (README "The local search"); 'evolution': the reference GA of TMPQ-DM
    # (configs/paper.py); or an evosax algorithm, e.g. 'CMA_ES', 'SimpleGA'
    c.algorithm = "local"
    c.population_size = 8
    c.generations = 3  # of each search (single-axis and joint): what the 10-minute default holds with 'local'
    c.num_parents = 3
    c.num_mutation = 4
    c.num_crossover = 2
    c.mutation_prob = 0.25
    c.max_redraw = 8  # rounds of redrawing genomes already seen (this generation or earlier)
    c.warm_start = True  # seed the joint search with the single-axis bests and greedy_bits
    # algorithm 'local' (tmpq_jax/search/local.py): local moves, per-site sensitivities, exact knapsack start
    c.expected_genes = 2.0  # genes a local mutant changes on average (ordinal +-1 bit moves)
    c.sensitivity_probe_bits = (5,)  # probed lower choices per operand; the others from the 4^-b noise model
    c.sensitivity_samples = 8  # fitness samples per probe (the probes' sampler runs count in the search's total)
    # probe score: 'deviation' from the all-top images, the 'fitness' change, the 'one_step' error from the FP run,
    # or 'noise_model' (no probes: MACs x 4^-b, the control)
    # (README "One-step sensitivities": deviation's knapsack start scored best on held-out noise)
    c.sensitivity_metric = "deviation"
    c.sensitivity_mac_share = 0.9  # probe the largest sites holding this share of MACs; the rest by the scale model
    # one front for every budget (results.json "pareto", pareto.png): fractions of the budget above (<= 4) or BitOPs
    c.budgets = (0.75, 1.0, 1.4)  # about W5A5+, W6A6 and W7A7 (all-5-bit costs 0.70x at 10 steps)
    c.pareto_generations = 1  # generations of the search at each budget other than the default one
    c.knapsack_weights = (0.25, 0.5, 0.75)  # weights' share of the additive damage, one knapsack start each
    c.dp_per_group = 8  # timestep DP on the quantized model (search/timestep_dp.py): candidate steps per group
    c.dp_samples = 8  # ... and fitness samples of its one-step errors
    # fitness (selection) and reports: each on its own noise (DESIGN.md Sec. 5)
    c.metric = "teacher_mse"  # paired pixel MSE to the FP teacher; chosen by the fidelity panel (README "Which fitness")
    c.fitness_reference = "mnist-fitness"  # reference data of the fitness (1000 train digits)
    c.search_samples = 16  # fitness noise: fold_in(key(noise_seed), 'fitness')
    c.fidelity_samples = ()  # successive halving, e.g. (8, 16): all at 8 samples, the best fidelity_keep at 16
    c.fidelity_keep = 0.5
    c.select_samples = 64  # top-k re-scoring noise: fold_in(key(noise_seed), 'select')
    c.rescore_top_k = 2
    # metric of that re-scoring ('' = the fitness metric; any fitness name): paired distance in Inception features,
    # which ordered knapsack start and greedy_bits as held-out Inception FID did in 6 of 6 benchmark pairs, where
    # teacher_mse missed 2 of 3 (README "The local search")
    c.select_metric = "teacher_inception"
    c.rescore_incumbents = True  # greedy_bits joins the re-scoring: a top-k that won on the fitness samples alone
    # (overfitted) loses to it on the select noise (README "The local search")
    c.rescore_starts = True  # algorithm 'local': its warm start (knapsack optima, their DP schedule) joins it too
    c.noise_seed = 0
    c.report_metrics = ("classifier_fd", "inception_fid")  # on the final candidates, report noise
    c.report_reference = "mnist-heldout"  # never what the fitness compares with
    c.final_samples = 128  # report noise: fold_in(key(report_noise_seed), 'report')
    c.report_noise_seed = 1
    c.fid_cache = ""  # Inception weights and reference stats; '' = $TMPQ_CACHE or ~/.cache/tmpq_jax
    c.fid_batch = 64  # 128 final samples = two Inception batches
    c.reference_steps = 100  # the FP reference sampler (and the teacher of paired metrics)
    c.baselines = ("uniform_w8a8", "uniform_w6a6", "timestep_only", "precision_only", "greedy_bits", "knapsack")
    # calibration (README "Calibration"; each technique is an option, the defaults are what
    # benchmarks/calibration_mnist-small_cpu.json chose)
    c.calib_trajectories = "candidates"  # FP trajectories of the DDIM-quad seed and random one-per-group schedules
    c.calib_schedules = 4  # ... the seed plus 3 random schedules ('uniform': calib_steps uniform steps instead)
    c.calib_steps = 20
    c.calib_samples = 32  # per schedule
    c.calib_batch = 128
    c.calib_ranges = "per_group"  # an activation range per timestep group of the space ('shared': one for all t)
    c.act_range_norm = 2.0  # activation ranges: shrunken min/max of least Lp error (2 = MSE; a larger p clips less)
    # sites whose activation ranges keep the calibration min/max (no clipping) at every bit-width: the GEGLU output
    # feeding the transformers' feed-forward, whose rare large values MSE clipping loses (README "Calibration")
    c.unclipped_sites = ("ff/net_2$",)
    c.unclipped_min_bits = 2  # ... at every bit-width; 6: 5-bit rows searched like the others (README "Calibration")
    c.split_skip = True  # separate ranges for the up-path and skip channels of up blocks' 1x1 shortcut inputs
    # learned rounding (AdaRound) and step sizes per block and bit-width (BRECQ-style). Off in this CPU default: it
    # takes about 8 minutes here (the 10-minute default run could not hold it) and helps most at 5-bit activations
    # (README "Calibration"); turn it on with --config.reconstruct=True, e.g. on an accelerator
    c.reconstruct = False
    c.recon_samples = 512  # calibration inputs recorded per block (the same number from every group)
    c.recon_iters = 80
    c.recon_batch = 16
    c.recon_lr_round = 1e-2  # BRECQ: 1e-3 and 4e-4 over 20k iterations; 10x for 80 on a 2-core CPU
    c.recon_lr_act = 4e-3
    c.recon_reg = 0.01
    c.recon_warmup = 0.2
    # execution
    c.strategy = "auto"
    c.chunk_size = 1
    c.sample_batch = 16  # rows per sampler call: every noise set (16 fitness, 64 select, 128 report, 500 held-out)
    # in batches of one size, so the quantized sampler compiles once (about 18 s each on the 2 cores; README "Results")
    return c
