"""The reference settings (TMPQ-DM): population 50, 20 generations, top-10 parents, 25 mutations, 10 crossovers,
FID-style fitness on 2000 samples, top-10 re-scored on more samples. Meant for a GPU or TPU."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import default  # noqa: E402


def get_config():
    c = default.get_config()
    c.algorithm = "evolution"  # the reference GA, with its own fitness for the top-k re-scoring
    c.select_metric = ""
    c.baselines = ("uniform_w8a8", "uniform_w6a6", "timestep_only", "precision_only", "greedy_bits")
    c.population_size = 50
    c.generations = 20
    c.budgets = ()  # the reference searches one budget; e.g. --config.budgets=(0.5,0.75) adds a front
    c.num_parents = 10
    c.num_mutation = 25
    c.num_crossover = 10
    c.mutation_prob = 0.25
    c.search_samples = 2000
    c.select_samples = 5000
    c.final_samples = 10000
    c.rescore_top_k = 10
    c.rescore_incumbents = False  # the reference re-scores its top-k only
    c.calib_steps = 50
    c.calib_samples = 256
    c.sample_batch = 1000
    return c
