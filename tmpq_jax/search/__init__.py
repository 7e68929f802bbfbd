"""Joint timestep + mixed-precision search (TMPQ-DM): space, evolutionary algorithm, fitness and the job."""

from tmpq_jax.search.algorithm import (EvolutionSearch, EvosaxSearch, EvoState, clean_fitness, crossover,
                                       make_repair, mutate)
from tmpq_jax.search.space import Genome, SearchSpace, group_starts

__all__ = ["EvolutionSearch", "EvosaxSearch", "EvoState", "clean_fitness", "crossover", "make_repair", "mutate",
           "Genome", "SearchSpace", "group_starts"]
