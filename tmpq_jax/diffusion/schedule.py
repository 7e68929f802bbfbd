"""A model's DDPM noise schedule and DDIM settings, read from a diffusers `scheduler_config.json`.

`NoiseSchedule` holds exactly what a deterministic DDIM sampler (Song et al. 2021, eq. 12 with sigma = 0) over a
given list of integer timesteps needs: the betas (Ho et al. 2020), the prediction target (epsilon, v: Salimans & Ho
2022, or x0), x0 clipping and abar after the last step. Its arrays equal `diffusers.DDIMScheduler`'s (computed here
in float64, where diffusers rounds betas to float32).

Config keys are handled as follows (see `from_scheduler_config`):
- `NoiseSchedule` fields: read and validated;
- keys starting with `_` (`_class_name`, `_diffusers_version`): metadata; `_class_name` picks the defaults of
  missing keys (`CLASS_DEFAULTS`), since e.g. a PNDM config without `set_alpha_to_one` means False;
- `IGNORED_KEYS`: no effect on DDIM (eta = 0) over given timesteps, ignored whatever their value;
- `RESTRICTED_KEYS`: ignored at the listed values only, anything else is unsupported;
- any other key: ValueError.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# Keys of diffusers' DDPM-family schedulers (DDIM, DDPM, PNDM, Euler, LMS, Heun, DPM-Solver, UniPC, DEIS, LCM, TCD)
# that do not change a deterministic DDIM step over timesteps chosen by the caller.
IGNORED_KEYS = {
    "skip_prk_steps": "PNDM's Runge-Kutta warm-up steps (PNDM only)",
    "interpolation_type": "Euler's sigma interpolation between integer timesteps",
    "use_karras_sigmas": "picks the sigma/timestep grid; timesteps are given here",
    "use_exponential_sigmas": "picks the sigma/timestep grid; timesteps are given here",
    "use_beta_sigmas": "picks the sigma/timestep grid; timesteps are given here",
    "sigma_min": "bounds of a Karras/exponential sigma grid",
    "sigma_max": "bounds of a Karras/exponential sigma grid",
    "final_sigmas_type": "last sigma of Euler/DPM-Solver grids (DDIM uses set_alpha_to_one)",
    "use_lu_lambdas": "DPM-Solver's log-SNR-uniform timestep grid",
    "lambda_min_clipped": "DPM-Solver's timestep grid bound",
    "solver_order": "multistep-solver order",
    "algorithm_type": "DPM-Solver variant",
    "solver_type": "DPM-Solver/UniPC second-order update",
    "lower_order_final": "multistep-solver final steps",
    "euler_at_final": "DPM-Solver final step",
    "predict_x0": "UniPC's update form",
    "disable_corrector": "UniPC's corrector steps",
    "solver_p": "UniPC's predictor",
    "dynamic_thresholding_ratio": "read only when thresholding is True (unsupported)",
    "sample_max_value": "read only when thresholding is True (unsupported)",
    "original_inference_steps": "LCM/TCD timestep grid",
    "timestep_scaling": "LCM/TCD consistency boundary condition, not used by DDIM",
    "flow_shift": "read only when use_flow_sigmas is True (unsupported)",
    "time_shift_type": "read only when use_dynamic_shifting is True (unsupported)",
}

# Keys ignored at these values only: other values change the model or the update (unsupported).
RESTRICTED_KEYS = {
    "variance_type": ((None, "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"),
                      "DDPM's ancestral variance (eta = 0 draws none); 'learned*' models also output variance "
                      "channels"),
    "thresholding": ((False,), "dynamic thresholding of x0 (Saharia et al. 2022) is not implemented"),
    "timestep_type": (("discrete",), "'continuous' conditions the model on log-sigma instead of integer t"),
    "use_flow_sigmas": ((False,), "flow-matching sigmas are not a DDPM schedule"),
    "use_dynamic_shifting": ((False,), "resolution-dependent flow-matching shift"),
    "shift_terminal": ((None,), "flow-matching terminal shift"),
}

# Defaults of missing keys per `_class_name` (diffusers 0.39 __init__ defaults), over DDIMScheduler's. Only fields
# whose defaults differ between classes are listed. An absent or unlisted class gets DDIMScheduler's defaults.
_NO_CLIP = {"clip_sample": False}
_LINSPACE = {"clip_sample": False, "timestep_spacing": "linspace"}
_LDM_BETAS = {"beta_start": 0.00085, "beta_end": 0.012}
CLASS_DEFAULTS = {
    "DDIMScheduler": {}, "DDIMParallelScheduler": {}, "DDPMScheduler": {}, "DDPMParallelScheduler": {},
    "PNDMScheduler": {**_NO_CLIP, "set_alpha_to_one": False},
    "EulerDiscreteScheduler": _LINSPACE, "EulerAncestralDiscreteScheduler": _LINSPACE,
    "LMSDiscreteScheduler": _LINSPACE, "DPMSolverMultistepScheduler": _LINSPACE,
    "DPMSolverSinglestepScheduler": _LINSPACE, "UniPCMultistepScheduler": _LINSPACE,
    "DEISMultistepScheduler": _LINSPACE,
    "HeunDiscreteScheduler": {**_LINSPACE, **_LDM_BETAS}, "KDPM2DiscreteScheduler": {**_LINSPACE, **_LDM_BETAS},
    "KDPM2AncestralDiscreteScheduler": {**_LINSPACE, **_LDM_BETAS},
    "LCMScheduler": {**_NO_CLIP, **_LDM_BETAS, "beta_schedule": "scaled_linear"},
    "TCDScheduler": {**_NO_CLIP, **_LDM_BETAS, "beta_schedule": "scaled_linear"},
}

CONFIG_NAME = "scheduler_config.json"


def _cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal (2021) eq. 17, abar(t) = cos^2((t/T + s)/(1 + s) pi/2) with s = 0.008; betas capped."""
    t = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    f = np.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.minimum(1.0 - f[1:] / f[:-1], max_beta)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. (2024), Algorithm 1: shift and scale sqrt(abar) so abar_T = 0 and abar_0 is kept."""
    s = np.sqrt(np.cumprod(1.0 - betas))
    s0, sT = s[0], s[-1]
    s = (s - sT) * (s0 / (s0 - sT))
    abar = s ** 2
    return 1.0 - np.concatenate([abar[:1], abar[1:] / abar[:-1]])


def _where(source: str | None) -> str:
    return f"{source}: " if source else ""


def _short(x: Any) -> str:
    r = repr(list(x) if isinstance(x, (tuple, np.ndarray)) else x)
    return r if len(r) <= 60 else r[:45] + f"... ({len(x)} entries)"


def _check_fields(v: dict[str, Any], source: str | None) -> None:
    """ValueError naming the field, its value, `source` and the valid values."""
    w = _where(source)

    def is_num(x):
        return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))

    def is_int(x):
        return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))

    T = v["num_train_timesteps"]
    if not is_int(T) or T < 1:
        raise ValueError(f"{w}num_train_timesteps={T!r} is invalid; valid: an integer >= 1")
    for k in ("beta_start", "beta_end"):
        if not is_num(v[k]) or not 0.0 < float(v[k]) < 1.0:
            raise ValueError(f"{w}{k}={v[k]!r} is invalid; valid: a number in (0, 1)")
    if v["beta_schedule"] not in BETA_SCHEDULES:
        raise ValueError(f"{w}unsupported beta_schedule={v['beta_schedule']!r}; valid: {', '.join(BETA_SCHEDULES)}")
    if v["prediction_type"] not in PREDICTION_TYPES:
        raise ValueError(f"{w}unsupported prediction_type={v['prediction_type']!r}; "
                         f"valid: {', '.join(PREDICTION_TYPES)}")
    if v["timestep_spacing"] not in TIMESTEP_SPACINGS:
        raise ValueError(f"{w}unsupported timestep_spacing={v['timestep_spacing']!r}; "
                         f"valid: {', '.join(TIMESTEP_SPACINGS)}")
    for k in ("clip_sample", "set_alpha_to_one", "rescale_betas_zero_snr"):
        if not isinstance(v[k], (bool, np.bool_)):
            raise ValueError(f"{w}{k}={v[k]!r} is invalid; valid: true, false")
    r = v["clip_sample_range"]
    if not is_num(r) or not 0.0 < float(r) < math.inf:
        raise ValueError(f"{w}clip_sample_range={r!r} is invalid; valid: a finite number > 0")
    if not is_int(v["steps_offset"]) or v["steps_offset"] < 0:
        raise ValueError(f"{w}steps_offset={v['steps_offset']!r} is invalid; valid: an integer >= 0")
    tb = v["trained_betas"]
    if tb is not None:
        ok = isinstance(tb, (list, tuple, np.ndarray)) and all(is_num(x) for x in np.asarray(tb, object).ravel())
        b = np.asarray(tb, np.float64) if ok else None
        if b is None or b.shape != (T,):
            raise ValueError(f"{w}trained_betas={_short(tb)} is invalid; valid: null or a list of "
                             f"num_train_timesteps={T} numbers")
        bad = np.flatnonzero(~((b > 0.0) & (b < 1.0)))
        if bad.size:
            raise ValueError(f"{w}trained_betas[{bad[0]}]={float(b[bad[0]])!r} is invalid; valid: numbers in (0, 1)")


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """DDPM betas and DDIM settings with diffusers' `DDIMScheduler` meaning and defaults (the MNIST model's)."""

    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    trained_betas: tuple[float, ...] | None = None
    rescale_betas_zero_snr: bool = False  # Lin et al. 2024: abar_T = 0, so eps-prediction fails at t = T-1
    timestep_spacing: str = "leading"  # `default_timesteps` (the FP teacher, calibration) and `first_timestep`
    # after clipping x0: re-derive eps from the clipped x0 (True: the project's own MNIST models) or keep the model's
    # eps (False: diffusers' DDIM default, use_clipped_model_output=False; set for every folder's scheduler config)
    clipped_model_output: bool = True

    def __post_init__(self):
        if self.trained_betas is not None and not isinstance(self.trained_betas, tuple):
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in np.asarray(self.trained_betas).ravel()))
        _check_fields(dataclasses.asdict(self), None)

    # --- arrays -------------------------------------------------------------------------------------------------

    def betas(self) -> np.ndarray:
        """beta_t for t = 0..T-1, float64."""
        T = self.num_train_timesteps
        if self.trained_betas is not None:
            b = np.asarray(self.trained_betas, np.float64)
        elif self.beta_schedule == "linear":  # Ho et al. 2020, Sec. 4
            b = np.linspace(self.beta_start, self.beta_end, T, dtype=np.float64)
        elif self.beta_schedule == "scaled_linear":  # latent diffusion: linear in sqrt(beta)
            b = np.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, T, dtype=np.float64) ** 2
        else:  # squaredcos_cap_v2
            b = _cosine_betas(T)
        return _rescale_zero_terminal_snr(b) if self.rescale_betas_zero_snr else b

    def alphas_cumprod(self) -> np.ndarray:
        """abar_t = prod_{s<=t} (1 - beta_s), float64 (DDPM eq. 4)."""
        return np.cumprod(1.0 - self.betas())

    def final_alpha_cumprod(self) -> float:
        """abar after the last DDIM step (diffusers' `final_alpha_cumprod`): 1, or abar_0 if not set_alpha_to_one."""
        return 1.0 if self.set_alpha_to_one else float(self.alphas_cumprod()[0])

    # --- sampler ------------------------------------------------------------------------------------------------

    def first_timestep(self) -> int:
        """The smallest timestep a DDIM schedule over this model may use, as diffusers' `DDIMScheduler` does:
        `steps_offset` under 'leading' spacing (`set_timesteps` adds it to every step), and at least 1 when
        `set_alpha_to_one` is False: the last step from t = 0 would then go to abar_prev = abar_0 = abar_t and
        return its input (DDIM eq. 12), a step that costs a UNet pass and does nothing."""
        offset = self.steps_offset if self.timestep_spacing == "leading" else 0
        return max(int(offset), 0 if self.set_alpha_to_one else 1)

    def check_sampleable(self, timesteps=None, source: str | None = None) -> None:
        """ValueError if DDIM over `timesteps` (default: all of 0..T-1) would divide by sqrt(abar_t) = 0.

        Zero terminal SNR (`rescale_betas_zero_snr`, Lin et al. 2024) makes abar_{T-1} = 0: epsilon prediction then
        has no x0 at t = T-1 (NaN samples, as in diffusers' DDIMScheduler); the paper trains such models with
        v-prediction."""
        ts = np.arange(self.num_train_timesteps) if timesteps is None else np.asarray(timesteps, np.int64).ravel()
        bad = ts[self.alphas_cumprod()[ts] <= 0.0]
        if bad.size and self.prediction_type == "epsilon":
            raise ValueError(f"{_where(source)}rescale_betas_zero_snr=true gives abar_t = 0 at t = {int(bad[0])}, where "
                             f"prediction_type='epsilon' has no x0 (DDIM divides by sqrt(abar_t): NaN samples); "
                             f"valid: prediction_type 'v_prediction' or 'sample' with zero terminal SNR, or "
                             f"rescale_betas_zero_snr=false")

    def sampler_kwargs(self) -> dict:
        """Keyword arguments of `ddim_sample` for this schedule (clip_x0 None: nothing is clipped, e.g. latents)."""
        return {"prediction_type": self.prediction_type,
                "clip_x0": float(self.clip_sample_range) if self.clip_sample else None,
                "final_abar": self.final_alpha_cumprod(), "clipped_eps": self.clipped_model_output}

    def default_timesteps(self, num_steps: int) -> np.ndarray:
        """The DDIM timesteps diffusers' `DDIMScheduler.set_timesteps(num_steps)` gives (Lin et al. 2024, Table 2),
        descending int32; 'leading' adds steps_offset."""
        T = self.num_train_timesteps
        if not 1 <= num_steps <= T:
            raise ValueError(f"num_steps must be in [1, {T}], got {num_steps}")
        if self.timestep_spacing == "leading":
            ts = np.arange(num_steps)[::-1] * (T // num_steps) + self.steps_offset
        elif self.timestep_spacing == "trailing":
            ts = np.round(np.arange(T, 0, -T / num_steps)).astype(np.int64) - 1
        else:  # linspace
            ts = np.linspace(0, T - 1, num_steps).round()[::-1]
        ts = ts.astype(np.int64)
        if ts.max() >= T:
            raise ValueError(f"{num_steps} '{self.timestep_spacing}' steps with steps_offset={self.steps_offset} "
                             f"reach t={ts.max()} >= num_train_timesteps={T}; use fewer steps")
        return ts.astype(np.int32)

    # --- configs ------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """JSON-ready diffusers scheduler keys (`DDIMScheduler(**d)` and `from_scheduler_config(d)` accept it)."""
        d = dataclasses.asdict(self)
        d.pop("clipped_model_output")  # not a scheduler config key: folders always use diffusers' behaviour
        d["trained_betas"] = None if self.trained_betas is None else list(self.trained_betas)
        return d

    @classmethod
    def from_scheduler_config(cls, config: dict, source: str = CONFIG_NAME) -> NoiseSchedule:
        """The schedule of a diffusers scheduler config dict; ValueError for anything DDIM here cannot honour."""
        w = _where(source)
        if not isinstance(config, dict):
            raise ValueError(f"{w}a scheduler config must be a JSON object, got {type(config).__name__}")
        class_name = config.get("_class_name")
        if isinstance(class_name, str) and class_name.startswith("FlowMatch"):
            raise ValueError(f"{w}_class_name={class_name!r} is a flow-matching scheduler, not a DDPM noise "
                             f"schedule; valid: DDPM-family schedulers ({', '.join(CLASS_DEFAULTS)})")
        names = [f.name for f in dataclasses.fields(cls)]
        values = {**{n: getattr(cls, n) for n in names}, **CLASS_DEFAULTS.get(class_name, {})}
        for key, value in config.items():
            if key.startswith("_") or key in IGNORED_KEYS:
                continue
            if key in RESTRICTED_KEYS:
                allowed, why = RESTRICTED_KEYS[key]
                if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
                    valid = ", ".join("null" if a is None else json.dumps(a) for a in allowed)
                    raise ValueError(f"{w}unsupported {key}={value!r}: {why}; valid: {valid}")
            elif key in names:
                values[key] = value
            else:
                raise ValueError(f"{w}unknown scheduler config key {key!r} (value {value!r}); valid keys: "
                                 f"{', '.join(names)}; ignored: {', '.join([*IGNORED_KEYS, *RESTRICTED_KEYS])}")
        values["clipped_model_output"] = False  # as diffusers' DDIMScheduler.step by default
        _check_fields(values, source)
        if values["trained_betas"] is not None:
            values["trained_betas"] = tuple(float(b) for b in values["trained_betas"])
        return cls(**values)

    @classmethod
    def from_folder(cls, path: str | Path) -> NoiseSchedule:
        """From `path/scheduler_config.json`, `path/scheduler/scheduler_config.json` (a pipeline) or the file."""
        path = Path(path)
        candidates = [path] if path.is_file() else [path / CONFIG_NAME, path / "scheduler" / CONFIG_NAME]
        for f in candidates:
            if f.is_file():
                try:
                    config = json.loads(f.read_text())
                except (ValueError, UnicodeDecodeError) as e:
                    raise ValueError(f"{str(f)!r} is not valid JSON: {e}") from e
                return cls.from_scheduler_config(config, source=str(f))
        raise FileNotFoundError("no scheduler config: " + " and ".join(repr(str(f)) for f in candidates)
                                + " are missing")
