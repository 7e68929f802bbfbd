"""Joint timestep + mixed-precision search (TMPQ-DM): space, budget, evolutionary algorithm, fitness, the job."""

from tmpq_jax.search.algorithm import (EvolutionSearch, EvosaxSearch, EvoState, clean_fitness, crossover, mutate,
                                       repeats)
from tmpq_jax.search.budget import Budget
from tmpq_jax.search.space import Genome, SearchSpace, group_starts

__all__ = ["EvolutionSearch", "EvosaxSearch", "EvoState", "clean_fitness", "crossover", "mutate", "repeats",
           "Budget", "Genome", "SearchSpace", "group_starts"]
