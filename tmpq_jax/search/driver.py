"""One resumable evolutionary search over a space: propose distinct candidates, repair them into the budget,
score them with successive halving on the sample count, tell the algorithm, checkpoint every generation.

- Distinct candidates: a genome already in this population or seen in an earlier generation is redrawn (at most
  `max_redraw` rounds, like the reference code's visited set); what is left after that is scored from the
  evaluator's cache and is not counted as new.
- Multi-fidelity (successive halving, Jamieson & Talwalkar 2016): all candidates at n_0 samples, the best
  `keep` fraction of them at n_1, and so on. The algorithm ranks candidates lexicographically: by the highest
  fidelity they reached, then by their score there (`rank_keys`: [levels not reached, score], no float offsets).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from tmpq_jax import checkpoint
from tmpq_jax.search.algorithm import lexicographic_ranks
from tmpq_jax.search.budget import Budget
from tmpq_jax.search.fitness import Evaluator, Metric, NoiseSet, candidate_key, nan_to_inf
from tmpq_jax.search.space import Genome, SearchSpace


class ConfigChangedError(ValueError):
    """--resume under settings that differ from the checkpoint's."""


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    """What one search needs beyond the algorithm: noise, fidelity levels, redraw bound, checkpoint."""

    noise_seed: int
    fidelity_samples: tuple[int, ...]  # ascending; the last is the search's full fidelity
    fidelity_keep: float = 0.5
    max_redraw: int = 8
    seed: int = 0

    def noise_sets(self) -> list[NoiseSet]:
        return [NoiseSet(self.noise_seed, "fitness", n) for n in self.fidelity_samples]


@dataclasses.dataclass
class SearchResult:
    name: str
    space: SearchSpace
    log: dict  # per generation and member: genomes, scores per level, rank, level, bitops, feasible, new, seconds
    history: list

    def scored(self) -> tuple[Genome, np.ndarray, np.ndarray]:
        """Every logged member flattened over generations: genomes (G*P, ...), full-fidelity fitness (inf where
        infeasible or stopped at a lower fidelity) and whether it was scored at all."""
        top_level = len(self.log["scores"][0, 0]) - 1
        fit = np.where(self.log["level"] == top_level, self.log["scores"][..., top_level], np.nan).ravel()
        flat = jax.tree.map(lambda x: np.asarray(x).reshape(-1, *x.shape[2:]), self.log["genomes"])
        return flat, nan_to_inf(fit), self.log["level"].ravel() >= 0

    def top_unique(self, k: int) -> list[tuple[Genome, float]]:
        """The k best distinct feasible genomes that reached full fidelity, with that fitness, best first."""
        flat, fit, _ = self.scored()
        out, seen = [], set()
        for i in np.argsort(fit, kind="stable"):
            if not np.isfinite(fit[i]) or len(out) == k:
                break
            g = jax.tree.map(lambda x: x[i], flat)
            sig = genome_key(g)
            if sig not in seen:
                seen.add(sig)
                out.append((g, float(fit[i])))
        return out


def genome_key(g: Genome) -> bytes:
    return b"|".join(np.asarray(x, np.int32).tobytes() for x in jax.tree.leaves(g))


def stack_genomes(genomes) -> Genome:
    """Host population (P, ...) of single genomes, numpy leaves."""
    return jax.tree.map(lambda *x: np.stack([np.asarray(v) for v in x]), *genomes)


def decode_np(space: SearchSpace, g: Genome):
    """Host decode of a population: timesteps (P, N) descending, w_bits, a_bits (P, L)."""
    ts = np.flip(np.asarray(space.starts, np.int32) + np.asarray(g.timestep_idx), axis=-1)
    choices = np.asarray(space.bit_choices, np.int32)
    return ts, choices[np.asarray(g.w_bit_idx)], choices[np.asarray(g.a_bit_idx)]


def _rows(pop: Genome, idx) -> Genome:
    return jax.tree.map(lambda x: np.asarray(x)[idx], pop)


def _set_rows(pop: Genome, idx, new: Genome) -> Genome:
    def put(x, y):
        x = np.array(x, copy=True)
        x[idx] = np.asarray(y)
        return x
    return jax.tree.map(put, pop, new)


def propose(ask, key, state, space: SearchSpace, budget: Budget, visited: set, max_redraw: int,
            warm: Sequence[Genome] = (), refine: Callable[[Genome], Genome] | None = None):
    """ask -> warm start -> repair (then `refine`, e.g. a fill of unused budget) -> redraw duplicates (bounded:
    half the rounds from `ask` with fresh keys, then uniform random candidates). Returns (pop, state, cost,
    feasible, new)."""
    def repair(p):
        p, cost, ok = budget.repair(p, space)
        if refine is not None:
            p = refine(p)
            cost = budget.cost_of(p)
            ok = cost <= budget.limit
        return p, np.asarray(cost), np.asarray(ok)

    pop, state = ask(key, state)
    pop = jax.tree.map(np.asarray, pop)
    given = stack_genomes(warm) if warm else None
    if warm:
        pop = _set_rows(pop, slice(-len(warm), None), given)
    pop, cost, feasible = repair(pop)
    if warm:  # a warm start that fits the budget enters as given: `refine` must not change the incumbent
        g_cost = np.asarray(budget.cost_of(given), np.int64).reshape(-1)
        fits = np.flatnonzero(g_cost <= budget.limit)
        rows = len(cost) - len(warm) + fits
        pop = _set_rows(pop, rows, _rows(given, fits))
        cost[rows], feasible[rows] = g_cost[fits], True

    def duplicates(pop):
        seen, dup = set(visited), []
        for i in range(len(cost)):
            k = genome_key(_rows(pop, i))
            dup.append(k in seen)
            seen.add(k)
        return np.asarray(dup)

    dup = duplicates(pop)
    for r in range(max_redraw):
        if not dup.any():
            break
        k = jax.random.fold_in(key, 1_000_003 + r)
        if r < max_redraw // 2:  # first the algorithm's own proposals, then uniform random candidates
            fresh, _ = ask(k, state)
        else:
            fresh = jax.vmap(space.random)(jax.random.split(k, len(cost)))
        fresh, f_cost, f_ok = repair(jax.tree.map(np.asarray, fresh))
        idx = np.flatnonzero(dup)
        pop = _set_rows(pop, idx, _rows(fresh, idx))
        cost[idx], feasible[idx] = f_cost[idx], f_ok[idx]
        dup = duplicates(pop)
    return pop, state, cost, feasible, ~dup


def rank_keys(scores: np.ndarray, level: np.ndarray) -> np.ndarray:
    """(P, 2) float32 lexicographic keys for `tell`: [fidelity levels not reached, score at the level reached].

    Unscored candidates (level -1) get [levels, inf]; a NaN score is +inf (infeasible). Keys compare exactly: no
    offset folds the level into the score."""
    scores, level = np.asarray(scores, np.float64), np.asarray(level)
    reached = np.flatnonzero(level >= 0)
    at = np.full(len(level), np.inf)
    at[reached] = scores[reached, level[reached]]
    levels_missing = np.where(level >= 0, scores.shape[1] - 1 - level, scores.shape[1])
    return np.stack([levels_missing, nan_to_inf(at)], axis=1).astype(np.float32)


def generation_ranks(keys: np.ndarray) -> np.ndarray:
    """Position of each candidate in the lexicographic order of `rank_keys` (0 = best), +inf if unscored or NaN."""
    return np.asarray(lexicographic_ranks(jnp.asarray(keys[:, 0]), jnp.asarray(keys[:, 1])), np.float64)


def score_population(evaluator: Evaluator, metric: Metric, space: SearchSpace, pop: Genome, feasible,
                     settings: SearchSettings):
    """Successive halving over the fidelity levels: (scores (P, levels), level reached (P,), keys (P, 2) from
    `rank_keys`)."""
    ts, wb, ab = decode_np(space, pop)
    levels = settings.noise_sets()
    p = len(ts)
    scores = np.full((p, len(levels)), np.nan)
    level = np.full(p, -1)
    alive = np.flatnonzero(np.asarray(feasible))
    for j, noise_set in enumerate(levels):
        if j > 0:
            prev = nan_to_inf(scores[alive, j - 1])
            keep = max(1, math.ceil(len(alive) * settings.fidelity_keep))
            alive = alive[np.argsort(prev, kind="stable")[:keep]]
            alive = alive[np.isfinite(nan_to_inf(scores[alive, j - 1]))]
        if not len(alive):
            break
        scores[alive, j] = evaluator.evaluate(ts[alive], wb[alive], ab[alive], noise_set, [metric])[:, 0]
        level[alive] = j
    return scores, level, rank_keys(scores, level)


def _fill_cache(evaluator: Evaluator, metric: Metric, space: SearchSpace, log: dict, gen: int,
                settings: SearchSettings) -> None:
    """Put the scores of a finished generation back into the evaluator's cache (resume = uninterrupted run)."""
    ts, wb, ab = decode_np(space, jax.tree.map(lambda x: x[gen], log["genomes"]))
    for i in range(len(ts)):
        for j, noise_set in enumerate(settings.noise_sets()[: int(log["level"][gen, i]) + 1]):
            evaluator.cache.setdefault((candidate_key(ts[i], wb[i], ab[i]), noise_set, metric.name),
                                       float(log["scores"][gen, i, j]))


def evolve(name: str, algo: Any, space: SearchSpace, budget: Budget, evaluator: Evaluator, metric: Metric,
           settings: SearchSettings, generations: int, workdir: Path, fingerprint: dict, resume: bool = False,
           warm: Sequence[Genome] = (), refine: Callable[[Genome], Genome] | None = None) -> SearchResult:
    """Run `algo` (init/ask/tell) on `space` for `generations`; checkpoint to workdir/search_<name>.msgpack."""
    key = jax.random.key(settings.seed)
    ask, tell = jax.jit(algo.ask), jax.jit(algo.tell)
    state = algo.init(key)
    g, p, nl = generations, algo.population_size, len(settings.fidelity_samples)
    log = {"genomes": jax.tree.map(lambda x: np.zeros((g, p, *x.shape), np.int32), space.seed()),
           "scores": np.full((g, p, nl), np.nan), "level": np.full((g, p), -1), "rank": np.full((g, p), np.inf),
           "bitops": np.zeros((g, p), np.int64), "feasible": np.zeros((g, p), bool), "new": np.zeros((g, p), bool),
           "seconds": np.zeros(g)}
    path = workdir / f"search_{name}.msgpack"
    meta_path = path.with_suffix(".json")
    start, visited = 0, set()
    if resume and path.exists():
        check_fingerprint(meta_path, fingerprint)
        saved = checkpoint.load_tree(path, {"state": state, "log": log, "generation": 0})
        state, start = jax.tree.map(jnp.asarray, saved["state"]), int(saved["generation"])
        log = jax.tree.map(np.array, saved["log"])
        for gen in range(start):
            _fill_cache(evaluator, metric, space, log, gen, settings)
            visited.update(genome_key(_rows(jax.tree.map(lambda x: x[gen], log["genomes"]), i)) for i in range(p))
        print(f"[{name}] resumed after generation {start}/{g} from {path}", flush=True)
    else:
        checkpoint.write_json(meta_path, fingerprint)
    bar = tqdm(range(start, g), desc=f"search {name}", unit="gen", initial=start, total=g)
    for gen in bar:
        t0 = time.time()
        k = jax.random.fold_in(key, gen)
        pop, state, cost, feasible, new = propose(ask, k, state, space, budget, visited, settings.max_redraw,
                                                  warm if gen == 0 else (), refine)
        scores, level, keys = score_population(evaluator, metric, space, pop, feasible, settings)
        state = tell(k, jax.tree.map(jnp.asarray, pop), jnp.asarray(keys), state)
        rank = generation_ranks(keys)
        for dst, src in zip(jax.tree.leaves(log["genomes"]), jax.tree.leaves(pop)):
            dst[gen] = src
        log["scores"][gen], log["level"][gen], log["rank"][gen] = scores, level, rank
        log["bitops"][gen], log["feasible"][gen], log["new"][gen] = cost, feasible, new
        log["seconds"][gen] = time.time() - t0
        visited.update(genome_key(_rows(pop, i)) for i in range(p))
        checkpoint.save_tree(path, {"state": state, "log": log, "generation": gen + 1})
        h = _history_row(name, log, gen)
        if checkpoint.is_primary():
            with open(workdir / "history.jsonl", "a") as f:  # live progress; rewritten in full at the end
                f.write(json.dumps(h) + "\n")
        bar.set_postfix(best=f"{h['best']:.4g}", new=h["new"], feasible=f"{h['feasible_fraction']:.2f}")
    bar.close()
    return SearchResult(name, space, log, [_history_row(name, log, gen) for gen in range(g)])


def _history_row(name: str, log: dict, gen: int) -> dict:
    top = log["scores"].shape[-1] - 1
    full = np.where(log["level"][: gen + 1] == top, log["scores"][: gen + 1, :, top], np.nan)
    this = full[-1][np.isfinite(full[-1])]
    seen = full[np.isfinite(full)]
    return {"search": name, "generation": gen, "best": float(seen.min()) if seen.size else math.inf,
            "median": float(np.median(this)) if this.size else None,
            "feasible_fraction": float(np.mean(log["feasible"][gen])), "new": int(log["new"][gen].sum()),
            "seconds": float(log["seconds"][gen])}


def check_fingerprint(path: Path, fingerprint: dict) -> None:
    """Refuse to resume under changed settings; name every differing field."""
    if not path.exists():
        raise ConfigChangedError(f"cannot resume: {path} (the settings of the checkpointed search) is missing; "
                                 "start a new search in a fresh workdir")
    old = json.loads(path.read_text())
    new = json.loads(json.dumps(fingerprint, default=str))
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        shown = "; ".join(f"{k}: checkpoint {old.get(k)!r} vs now {new.get(k)!r}" for k in diff[:8])
        raise ConfigChangedError(f"cannot resume the search in {path.parent}: settings changed ({shown}). Resume "
                                 "with the original settings, or start a fresh workdir")
