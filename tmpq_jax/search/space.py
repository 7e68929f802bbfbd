"""The joint search space of TMPQ-DM: one timestep per group, and a weight and activation bit-width per site.

A genome is three int32 arrays (a `Genome`); a population is the same with a leading axis.
- `timestep_idx[N]`: offset of the chosen step inside group i (groups are [start_i, start_{i+1}), last up to T).
- `w_bit_idx[L]`, `a_bit_idx[L]`: indices into `bit_choices`, sorted descending, so index + 1 means fewer bits.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from tmpq_jax.diffusion import NUM_TRAIN_TIMESTEPS
from tmpq_jax.quant.fake_quant import check_bit_choices


@flax.struct.dataclass
class Genome:
    timestep_idx: jax.Array
    w_bit_idx: jax.Array
    a_bit_idx: jax.Array


def group_starts(num_steps: int, spacing: str = "quad", num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
                 starts: Sequence[int] | None = None, first_timestep: int = 0) -> np.ndarray:
    """Group start points, ascending. 'quad': floor(linspace(0, sqrt(0.8 T), N)^2) as in the reference code,
    'uniform': i T // N (diffusers' 'leading' grid); both shifted by `first_timestep` (the schedule's
    `NoiseSchedule.first_timestep()`: steps_offset, and no t whose DDIM step returns its input). 'custom': `starts`
    as given, the first >= `first_timestep`."""
    if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be an integer in [1, {num_train_timesteps}] (the training steps), "
                         f"got {num_steps!r}")
    if not isinstance(first_timestep, (int, np.integer)) or not 0 <= first_timestep < num_train_timesteps:
        raise ValueError(f"first_timestep must be an integer in [0, {num_train_timesteps - 1}], got {first_timestep!r}")
    if spacing == "quad":
        b = np.floor(np.linspace(0, np.sqrt(0.8 * num_train_timesteps), num_steps) ** 2).astype(np.int64)
        b = b + first_timestep
    elif spacing == "uniform":
        b = (np.arange(num_steps) * num_train_timesteps) // num_steps + first_timestep
    elif spacing == "custom":
        if starts is None:
            raise ValueError(f"spacing='custom' needs group starts, e.g. {[first_timestep, 10, 50, 200]}")
        b = np.asarray(starts, np.int64)
        if b.shape != (num_steps,):
            raise ValueError(f"custom group starts must list {num_steps} values (one per step), got {b.tolist()}")
        if b[0] < first_timestep or b.max() >= num_train_timesteps:
            why = (f" (the schedule's first usable timestep: steps_offset, or the step from t = 0 returns its "
                   f"input)" if first_timestep else "")
            raise ValueError(f"custom group starts must begin at >= {first_timestep}{why} and stay below "
                             f"{num_train_timesteps}, got {b.tolist()}")
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; valid: 'quad', 'uniform', 'custom'")
    if b.max() >= num_train_timesteps:
        raise ValueError(f"{spacing} groups shifted to start at t = {first_timestep} reach t = {int(b.max())} >= "
                         f"num_train_timesteps={num_train_timesteps}; use fewer steps")
    if np.any(np.diff(b) <= 0):
        dup = b[1:][np.diff(b) <= 0].tolist()
        raise ValueError(f"{spacing} spacing with {num_steps} steps gives empty timestep groups (repeated starts "
                         f"{dup[:5]}); use fewer steps or another spacing")
    return b.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """Static description of the space. Hashable, so it can be closed over by jitted functions."""

    starts: tuple[int, ...]
    bit_choices: tuple[int, ...]  # descending
    num_sites: int
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
    search_timesteps: bool = True
    search_bits: bool = True
    seed_bits: int = 6
    seed_timestep_idx: tuple[int, ...] = ()  # the seed's offsets in each group; () = DDIM-quad (all 0)

    @classmethod
    def create(cls, num_steps: int, num_sites: int, bit_choices: Sequence[int] = (8, 7, 6, 5),
               spacing: str = "quad", starts: Sequence[int] | None = None, seed_bits: int = 6,
               num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, first_timestep: int = 0) -> "SearchSpace":
        """`first_timestep`: the model schedule's `first_timestep()`, where the groups begin."""
        b = group_starts(num_steps, spacing, num_train_timesteps, starts, first_timestep)
        choices = sorted(check_bit_choices(bit_choices).tolist(), reverse=True)
        if seed_bits not in choices:
            raise ValueError(f"seed_bits={seed_bits} must be one of the bit choices {choices}")
        if num_sites < 1:
            raise ValueError(f"num_sites must be >= 1, got {num_sites}")
        return cls(tuple(int(x) for x in b), tuple(choices), int(num_sites), num_train_timesteps,
                   seed_bits=int(seed_bits))

    def restrict(self, search_timesteps: bool = True, search_bits: bool = True) -> "SearchSpace":
        """The same space with one part frozen at the seed (for timestep-only / precision-only searches)."""
        return dataclasses.replace(self, search_timesteps=search_timesteps, search_bits=search_bits)

    @property
    def num_steps(self) -> int:
        return len(self.starts)

    @property
    def group_sizes(self) -> np.ndarray:
        b = np.asarray(self.starts + (self.num_train_timesteps,))
        return np.diff(b).astype(np.int32)

    @property
    def groups(self) -> list[tuple[int, int]]:
        """Inclusive [first, last] timestep of each group."""
        return [(int(s), int(s + n - 1)) for s, n in zip(self.starts, self.group_sizes)]

    # --- decode -------------------------------------------------------------------------------------------------

    def timesteps(self, g: Genome) -> jax.Array:
        """Descending timesteps (..., N)."""
        return jnp.flip(jnp.asarray(self.starts, jnp.int32) + g.timestep_idx, axis=-1)

    def bits(self, idx: jax.Array) -> jax.Array:
        return jnp.asarray(self.bit_choices, jnp.int32)[idx]

    def decode(self, g: Genome):
        return self.timesteps(g), self.bits(g.w_bit_idx), self.bits(g.a_bit_idx)

    def encode(self, timesteps, w_bits, a_bits) -> Genome:
        """The genome of a decoded candidate (descending timesteps, one per group; bits among the choices); the
        inverse of `decode`. Errors name the value and the valid range."""
        ts = np.asarray(timesteps, np.int64)[::-1]
        if ts.shape != (self.num_steps,):
            raise ValueError(f"{len(ts)} timesteps for N={self.num_steps} groups")
        idx = ts - np.asarray(self.starts, np.int64)
        bad = np.flatnonzero((idx < 0) | (idx >= self.group_sizes))
        if len(bad):
            lo, hi = self.groups[int(bad[0])]
            raise ValueError(f"timestep {int(ts[bad[0]])} is outside its group {int(bad[0])}: [{lo}, {hi}]")
        out = []
        for name, b in (("w_bits", w_bits), ("a_bits", a_bits)):
            b = np.asarray(b, np.int64)
            if b.shape != (self.num_sites,) or not np.isin(b, self.bit_choices).all():
                raise ValueError(f"{name} must be {self.num_sites} values among {list(self.bit_choices)}, got "
                                 f"shape {b.shape} with values {sorted(set(b.ravel().tolist()))}")
            out.append(np.asarray([self.bit_choices.index(int(v)) for v in b], np.int32))
        return Genome(idx.astype(np.int32), *out)

    # --- candidates ---------------------------------------------------------------------------------------------

    def seed(self) -> Genome:
        """DDIM-quad (first step of every group) at `seed_bits` everywhere."""
        b = self.bit_choices.index(self.seed_bits)
        t = jnp.asarray(self.seed_timestep_idx, jnp.int32) if self.seed_timestep_idx else jnp.zeros(self.num_steps,
                                                                                                    jnp.int32)
        return Genome(t, jnp.full(self.num_sites, b, jnp.int32), jnp.full(self.num_sites, b, jnp.int32))

    def with_seed_timesteps(self, timestep_idx) -> "SearchSpace":
        """The same space seeded (and, where timesteps are frozen, fixed) at other offsets, one per group."""
        idx = tuple(int(i) for i in np.asarray(timestep_idx).reshape(-1))
        if len(idx) != self.num_steps or any(not 0 <= i < n for i, n in zip(idx, self.group_sizes)):
            raise ValueError(f"seed timestep offsets {list(idx)} must be one per group, inside the group sizes "
                             f"{self.group_sizes.tolist()}")
        return dataclasses.replace(self, seed_timestep_idx=idx)

    def uniform_bits(self, bits: int) -> Genome:
        if bits not in self.bit_choices:
            raise ValueError(f"{bits} bits is not among the bit choices {list(self.bit_choices)}")
        b = self.bit_choices.index(bits)
        return Genome(jnp.zeros(self.num_steps, jnp.int32), jnp.full(self.num_sites, b, jnp.int32),
                      jnp.full(self.num_sites, b, jnp.int32))

    def freeze(self, g: Genome) -> Genome:
        """Put frozen parts back to the seed."""
        s = self.seed()
        return Genome(g.timestep_idx if self.search_timesteps else jnp.broadcast_to(s.timestep_idx, g.timestep_idx.shape),
                      g.w_bit_idx if self.search_bits else jnp.broadcast_to(s.w_bit_idx, g.w_bit_idx.shape),
                      g.a_bit_idx if self.search_bits else jnp.broadcast_to(s.a_bit_idx, g.a_bit_idx.shape))

    def random(self, key: jax.Array) -> Genome:
        kt, kw, ka = jax.random.split(key, 3)
        sizes = jnp.asarray(self.group_sizes)
        t = jnp.floor(jax.random.uniform(kt, (self.num_steps,)) * sizes).astype(jnp.int32)
        nb = len(self.bit_choices)
        return self.freeze(Genome(t, jax.random.randint(kw, (self.num_sites,), 0, nb),
                                  jax.random.randint(ka, (self.num_sites,), 0, nb)))

    def validate(self, g: Genome) -> None:
        """Concrete range checks of a genome (for user-given candidates)."""
        t, w, a = (np.asarray(x) for x in (g.timestep_idx, g.w_bit_idx, g.a_bit_idx))
        if t.shape[-1:] != (self.num_steps,) or w.shape[-1:] != (self.num_sites,) or a.shape[-1:] != (self.num_sites,):
            raise ValueError(f"genome shapes {t.shape}, {w.shape}, {a.shape} do not match N={self.num_steps}, "
                             f"L={self.num_sites}")
        if np.any(t < 0) or np.any(t >= self.group_sizes):
            raise ValueError(f"timestep_idx {t.tolist()} outside the group sizes {self.group_sizes.tolist()}")
        for name, x in (("w_bit_idx", w), ("a_bit_idx", a)):
            if np.any(x < 0) or np.any(x >= len(self.bit_choices)):
                raise ValueError(f"{name} must index the {len(self.bit_choices)} bit choices, got values "
                                 f"{sorted(set(x.ravel().tolist()))}")
