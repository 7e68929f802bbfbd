"""The embedded default: search timesteps and per-site bits for the committed mnist-small UNet on 2 CPU cores.

Fitness: Frechet distance in the project classifier's feature space (not Inception FID); the final candidates
are also scored with standard Inception FID (needs `python experiments/fid.py fetch-weights` once).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # model
    c.model = "mnist-small"
    c.checkpoint = "checkpoints/mnist-small/ema_params.msgpack"
    c.seed = 0
    c.multihost = False
    # search space
    c.num_steps = 10
    c.spacing = "quad"  # 'quad' | 'uniform' | 'custom' (then group_starts)
    c.group_starts = ()  # tuples, so that --config.bit_choices="(8, 6, 4)" works on the command line
    c.bit_choices = (8, 7, 6, 5)
    c.seed_bits = 6
    c.probs_8bit = True  # attention probabilities at 8 bits, as in the reference code
    c.rules = []  # e.g. [dict(pattern="conv_in$", w_bits=8, a_bits=8)]
    # budget
    c.budget_bits = 6  # uniform W6A6 at num_steps ...
    c.budget_bitops = 0.0  # ... unless an explicit BitOPs budget is given
    c.budget_mode = "repair"  # 'repair' | 'infeasible'
    # algorithm
    c.algorithm = "evolution"  # or an evosax algorithm, e.g. 'CMA_ES', 'SimpleGA'
    c.population_size = 8
    c.generations = 4
    c.num_parents = 3
    c.num_mutation = 4
    c.num_crossover = 2
    c.mutation_prob = 0.25
    c.warm_start = True  # seed the joint search with the bests of the timestep-only and precision-only searches
    # fitness
    c.metric = "classifier_fd"  # cheap search-time fitness; 'inception_fid' for standard FID
    c.report_metrics = ("inception_fid",)  # also scored on the final image sets (best, baselines, FP reference)
    c.fid_reference = "mnist-heldout"  # 'mnist-heldout' | 'mnist-train' | 'mnist-all' | an .npz of images or stats
    c.fid_cache = ""  # Inception weights and reference stats; '' = $TMPQ_CACHE or ~/.cache/tmpq_jax
    c.fid_batch = 64  # 128 final samples = two Inception batches
    c.search_samples = 40
    c.final_samples = 128
    c.rescore_top_k = 3
    c.noise_seed = 0
    c.reference_steps = 100
    c.baselines = ("uniform_w8a8", "uniform_w6a6", "timestep_only", "precision_only")
    # calibration
    c.calib_steps = 20
    c.calib_samples = 32
    c.calib_batch = 128
    # execution
    c.strategy = "auto"
    c.chunk_size = 1
    c.sample_batch = 256
    return c
