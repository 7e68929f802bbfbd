"""Per-site sensitivities: the fitness change when one operand of one site alone drops below the top bit-width.

A probe is the all-top candidate (DDIM-quad timesteps, every site at the highest bit choice) with one site's weights
*or* activations at a lower choice. `probes` lists them; `damage_tables` turns probe scores into (L, B) damage per
operand (0 at the top), the additive model of the knapsack (`knapsack.additive_damage`).

The probe score is the fitness (`damage = fitness(probe) - fitness(all-top)`), the *deviation* (the default
config's): the mean squared pixel difference between the probe's images and the all-top candidate's on the same
noise (`deviation_scores`), or the *one-step* error (`Evaluator.step_errors`): one quantized sampling step from each
state of the FP run, its squared distance to the FP's next state, minus the all-top candidate's. The fitness
difference is a small change of a large error (the few-step sampler against the fine teacher), so on a few samples it
can be negative and its offset (the all-top score's own noise) shifts every probe alike. The deviation is >= 0 and 0
at the top, but any change of one site re-rounds the 8-bit activations downstream and the run compounds it: a site at
7 bits deviates about as much as at 5 (README "One-step sensitivities"). The one-step error does not compound.

The *noise model* (`noise_model_tables`) probes nothing: every operand's damage is its MACs times the extra
quantization noise power of its choice, MACs x (4^-b - 4^-top), the control that says what the probes add.

Probing every lower choice costs 2 L (B - 1) sampler runs (672 for mnist-small). `probe_bits` limits the probes to
some choices; the other lower choices are then interpolated from the probed ones by the quantization-noise model
damage(b) proportional to 4^-b (uniform quantization noise power halves its step per bit), fitted per operand on the
probed choices. Pinned operands (rules) are never probed and have no damage.

`mac_share` < 1 probes only the largest sites, by MACs, that together hold that share of all MACs (mnist-small:
42 of 112 sites hold 90%); a small site's damage is then its MACs times the median damage per MAC of the probed
sites at that choice (the scale model). Small sites cost little BitOPs at any bit-width, so an error in their damage
moves little budget.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tmpq_jax.search.budget import Budget


@dataclasses.dataclass(frozen=True)
class Probe:
    site: int
    operand: str  # 'w' | 'a'
    bit_idx: int  # index into bit_choices (> 0)


def probed_sites(budget: Budget, mac_share: float = 1.0) -> np.ndarray:
    """bool (L,): the largest sites by MACs (ties: site order) whose MACs first reach `mac_share` of the total."""
    if not 0.0 < mac_share <= 1.0:
        raise ValueError(f"mac_share={mac_share!r} must be in (0, 1]")
    macs = np.asarray(budget.macs, np.float64)
    order = np.argsort(-macs, kind="stable")
    share = np.cumsum(macs[order]) / macs.sum()
    keep = np.zeros(len(macs), bool)
    keep[order[: int(np.searchsorted(share, mac_share - 1e-12)) + 1]] = True
    return keep


def probes(budget: Budget, probe_bits=None, mac_share: float = 1.0) -> list[Probe]:
    """The probes of every searched operand of the `probed_sites` at each probed lower choice (default: every lower
    choice, every site)."""
    choices = list(budget.bit_choices)
    lower = choices[1:]
    probe_bits = lower if probe_bits is None else list(probe_bits)
    bad = [b for b in probe_bits if b not in lower]
    if bad or not probe_bits:
        raise ValueError(f"probe_bits {list(probe_bits)} must be non-empty and among the lower bit choices {lower}")
    idx = sorted(choices.index(b) for b in set(probe_bits))
    keep = probed_sites(budget, mac_share)
    out = []
    for operand, fixed in (("w", budget.fixed_w), ("a", budget.fixed_a)):
        for site, f in enumerate(fixed):
            if f == 0 and keep[site]:
                out.extend(Probe(site, operand, i) for i in idx)
    return out


def probe_bits_arrays(budget: Budget, plist: list[Probe]) -> tuple[np.ndarray, np.ndarray]:
    """(P, L) w and a bit indices of the probes (index 0 = the top choice elsewhere)."""
    L = len(budget.macs)
    w = np.zeros((len(plist), L), np.int32)
    a = np.zeros((len(plist), L), np.int32)
    for k, p in enumerate(plist):
        (w if p.operand == "w" else a)[k, p.site] = p.bit_idx
    return w, a


def deviation_scores(top: np.ndarray, probe_images: np.ndarray) -> np.ndarray:
    """(P,) mean squared difference of each probe's images (P, n, ...) to the all-top candidate's (n, ...)."""
    top, probe_images = np.asarray(top, np.float64), np.asarray(probe_images, np.float64)
    if probe_images.shape[1:] != top.shape:
        raise ValueError(f"probe images {probe_images.shape} do not match the all-top images {top.shape}")
    return np.mean((probe_images - top[None]) ** 2, axis=tuple(range(1, probe_images.ndim)))


def damage_tables(budget: Budget, plist: list[Probe], scores, base_score: float) -> tuple[np.ndarray, np.ndarray]:
    """(L, B) damage of weights and of activations: probe score - all-top score where probed; unprobed lower
    choices of a probed operand from the 4^-b model, unprobed sites from the scale model (module docstring). A NaN probe score (a broken candidate) is
    an error naming the probe, not a silent zero."""
    scores = np.asarray(scores, np.float64)
    if len(scores) != len(plist):
        raise ValueError(f"{len(scores)} scores for {len(plist)} probes")
    if not np.isfinite(base_score):
        raise ValueError(f"the all-top candidate's score is {base_score}; sensitivities need a finite reference")
    bad = [p for p, s in zip(plist, scores) if not np.isfinite(s)]
    if bad:
        raise ValueError(f"{len(bad)} probes scored non-finite, e.g. site {bad[0].site} {bad[0].operand} at "
                         f"{budget.bit_choices[bad[0].bit_idx]} bits")
    L, B = len(budget.macs), len(budget.bit_choices)
    measured = {"w": np.full((L, B), np.nan), "a": np.full((L, B), np.nan)}
    for p, s in zip(plist, scores):
        measured[p.operand][p.site, p.bit_idx] = s - base_score
    out = []
    for operand, fixed in (("w", budget.fixed_w), ("a", budget.fixed_a)):
        m = measured[operand]
        m[:, 0] = 0.0
        extra = extra_noise_power(budget.bit_choices)
        for site in range(L):
            if fixed[site] != 0:
                m[site] = 0.0
                continue
            known = np.isfinite(m[site])
            known[0] = False
            if known.any() and not known[1:].all():
                scale = np.mean(m[site, known] / extra[known])  # damage per unit of extra noise
                m[site, ~np.isfinite(m[site])] = scale * extra[~np.isfinite(m[site])]
        unprobed = ~np.isfinite(m).all(axis=1)
        if unprobed.any():
            macs = np.asarray(budget.macs, np.float64)
            probed = ~unprobed & (np.asarray(fixed) == 0)
            if not probed.any():
                raise ValueError(f"no {operand} operand was probed: the scale model needs at least one")
            per_mac = np.median(m[probed] / macs[probed, None], axis=0)
            m[unprobed] = per_mac[None, :] * macs[unprobed, None]
        out.append(m)
    return out[0], out[1]


def noise_model_tables(budget: Budget) -> tuple[np.ndarray, np.ndarray]:
    """(L, B) damage of weights and of activations without probes: MACs x (4^-b - 4^-top) per searched operand
    (uniform quantization noise power at b bits, relative to the top choice), 0 for pinned operands."""
    extra = np.outer(np.asarray(budget.macs, np.float64), extra_noise_power(budget.bit_choices))
    return tuple(np.where((np.asarray(fixed) == 0)[:, None], extra, 0.0)
                 for fixed in (budget.fixed_w, budget.fixed_a))


def extra_noise_power(bit_choices) -> np.ndarray:
    """(B,) 4^-b - 4^-top: the quantization noise power each choice adds over the top one (uniform rounding noise
    power quarters with each bit), the 4^-b model of `damage_tables` and `noise_model_tables`."""
    noise = 4.0 ** -np.asarray(bit_choices, np.float64)
    return noise - noise[0]
