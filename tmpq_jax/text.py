"""Text conditioning for Stable Diffusion searches: prompt lists, precomputed embeddings, a CLIP text encoder.

A Stable Diffusion UNet is conditioned on the CLIP text encoder's `last_hidden_state`, `(n, 77, D)` (D = 768 for
SD 1.x, 1024 for SD 2.x). A run keeps one row per prompt (`PromptEmbeddings.embeds`, sample i uses prompt i % P)
and the unconditional rows for classifier-free guidance (`negative`: the encoding of `negative_prompt`, "" by
default).

`prompt_embeddings` is the one entry point a run uses: it loads an `.npz` of precomputed embeddings, or reads a
prompt file and encodes it with the pipeline folder's own `text_encoder/` and `tokenizer/`, caching the result in
the run's workdir so a resumed or repeated run does not encode again.

Encoder choice: the PyTorch `transformers.CLIPTextModel`, run once per prompt list on the CPU. transformers 5.x has
no Flax models, and the last line with Flax CLIP (4.57.x) requires `huggingface-hub<1.0`, which conflicts with the
hub that diffusers 0.39 is installed with here. The encoder runs once per run and its output is cached, so torch
costs nothing inside the search; torch and transformers are needed only on this path (the `text` extra:
`pip install -e ".[text]"`). Precomputed embeddings (`save_prompt_embeds`, or `python -m tmpq_jax.text`) need
neither.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

MAX_LENGTH = 77
CACHE_VERSION = 1
EXTRA_HINT = 'pip install -e ".[text]"'
WEIGHT_NAMES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _precomputed_hint(model_dir: str | os.PathLike | None = None) -> str:
    """How to pass and how to make a precomputed embeddings file."""
    d = model_dir if model_dir is not None else "MODEL_DIR"
    return ("pass precomputed embeddings with --config.prompt_embeds=FILE.npz (keys prompt_embeds (n, 77, D) and "
            "negative_prompt_embeds (n or 1, 77, D)); make that file where the text encoder is available with "
            f"`python -m tmpq_jax.text {d} PROMPTS.txt FILE.npz` (needs {EXTRA_HINT})")


def read_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt per line, stripped; blank lines and `#` comments skipped."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompt file {p} does not exist (one prompt per line)")
    prompts = [s.strip() for s in p.read_text(encoding="utf-8").splitlines()]
    prompts = [s for s in prompts if s and not s.startswith("#")]
    if not prompts:
        raise ValueError(f"prompt file {p} has no prompts (one per line; blank lines and # comments are skipped)")
    return prompts


@dataclasses.dataclass(frozen=True, eq=False)
class PromptEmbeddings:
    """One conditional and one unconditional embedding per prompt: `embeds`, `negative` float32 (P, L, D)."""

    prompts: tuple[str, ...]
    embeds: np.ndarray
    negative: np.ndarray
    source: str = ""

    def __post_init__(self):
        # normalise: float32, read-only, negative broadcast from one row
        embeds = np.array(self.embeds, dtype=np.float32)
        negative = np.asarray(self.negative, dtype=np.float32)
        if embeds.ndim != 3 or embeds.shape[0] == 0:
            raise ValueError(f"embeds has shape {embeds.shape}; expected (P, L, D) with P >= 1")
        if negative.shape[1:] != embeds.shape[1:] or negative.shape[0] not in (1, embeds.shape[0]):
            raise ValueError(f"negative has shape {negative.shape}; expected {embeds.shape} or "
                             f"(1, {embeds.shape[1]}, {embeds.shape[2]})")
        negative = np.array(np.broadcast_to(negative, embeds.shape), dtype=np.float32)
        prompts = tuple(str(s) for s in self.prompts)
        if len(prompts) != embeds.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {embeds.shape[0]} embeddings")
        for a in (embeds, negative):
            a.setflags(write=False)
        object.__setattr__(self, "prompts", prompts)
        object.__setattr__(self, "embeds", embeds)
        object.__setattr__(self, "negative", negative)

    @property
    def num_prompts(self) -> int:
        return self.embeds.shape[0]

    @property
    def length(self) -> int:
        return self.embeds.shape[1]

    @property
    def context_dim(self) -> int:
        return self.embeds.shape[2]

    def rows(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(conditional, unconditional) rows for samples 0..n-1 (sample i uses prompt i % P)."""
        idx = np.arange(n) % self.num_prompts
        return self.embeds[idx], self.negative[idx]

    def digest(self) -> str:
        """sha256 of the prompts and both arrays (not of `source`)."""
        h = hashlib.sha256()
        h.update(json.dumps(list(self.prompts)).encode())
        for a in (self.embeds, self.negative):
            h.update(str(a.shape).encode())
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()


def _check_shape(where: Path, key: str, a: np.ndarray, context_dim: int | None, length: int,
                 n: int | str = "n") -> None:
    """ValueError naming the key, the shape found and the shape expected."""
    d = context_dim if context_dim is not None else (a.shape[-1] if a.ndim == 3 else "D")
    expected = f"({n}, {length}, {d})"
    ok = a.ndim == 3 and a.shape[1] == length and (context_dim is None or a.shape[2] == context_dim)
    if not ok:
        raise ValueError(f"{where}: {key} has shape {tuple(a.shape)}; the UNet expects {expected}")


def load_prompt_embeds(path: str | os.PathLike, context_dim: int | None = None,
                       length: int = MAX_LENGTH) -> PromptEmbeddings:
    """Read an `.npz` of `prompt_embeds` (n, L, D), optional `negative_prompt_embeds` (n or 1, L, D), optional
    `prompts` (n strings). A missing negative is taken as zeros (the SDXL convention for an empty negative prompt)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompt embeddings file {p} does not exist")
    # 1. read the arrays (no pickles)
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same message
        raise ValueError(f"{p} is not a readable .npz of prompt embeddings: {e}") from e
    if "prompt_embeds" not in arrays:
        raise ValueError(f"{p}: key prompt_embeds missing (keys found: {sorted(arrays)}); expected prompt_embeds "
                         f"(n, {length}, {context_dim or 'D'}) and optionally negative_prompt_embeds")
    # 2. conditional rows: numeric, shape, finite
    emb = arrays["prompt_embeds"]
    if not np.issubdtype(emb.dtype, np.number):
        raise ValueError(f"{p}: prompt_embeds has dtype {emb.dtype}; expected floats")
    _check_shape(p, "prompt_embeds", emb, context_dim, length)
    n = emb.shape[0]
    if n == 0:
        raise ValueError(f"{p}: prompt_embeds has shape {emb.shape}; expected at least one row")
    bad = int(np.size(emb) - np.isfinite(emb).sum())
    if bad:
        raise ValueError(f"{p}: prompt_embeds has {bad} non-finite values (NaN or inf)")
    # 3. unconditional rows: (n, L, D) or (1, L, D), or zeros when absent
    if "negative_prompt_embeds" in arrays:
        neg = arrays["negative_prompt_embeds"]
        if not np.issubdtype(neg.dtype, np.number):
            raise ValueError(f"{p}: negative_prompt_embeds has dtype {neg.dtype}; expected floats")
        d = emb.shape[2]
        if neg.ndim != 3 or neg.shape[0] not in (1, n) or neg.shape[1:] != emb.shape[1:]:
            raise ValueError(f"{p}: negative_prompt_embeds has shape {tuple(neg.shape)}; the UNet expects "
                             f"({n}, {length}, {d}) or (1, {length}, {d})")
        bad = int(np.size(neg) - np.isfinite(neg).sum())
        if bad:
            raise ValueError(f"{p}: negative_prompt_embeds has {bad} non-finite values (NaN or inf)")
    else:
        print(f"text: {p} has no negative_prompt_embeds; guidance uses zero unconditional embeddings", flush=True)
        neg = np.zeros((1, *emb.shape[1:]), np.float32)
    # 4. prompt names: stored strings or embeds[i]
    if "prompts" in arrays:
        names = [str(s) for s in np.asarray(arrays["prompts"]).reshape(-1)]
        if len(names) != n:
            raise ValueError(f"{p}: prompts has {len(names)} entries for {n} rows of prompt_embeds")
    else:
        names = [f"embeds[{i}]" for i in range(n)]
    return PromptEmbeddings(tuple(names), emb, neg, source=str(p))


def save_prompt_embeds(path: str | os.PathLike, pe: PromptEmbeddings) -> Path:
    """Write `pe` as the `.npz` that `load_prompt_embeds` reads (atomically)."""
    p = Path(path)
    if jax.process_index() != 0:  # multi-host: only process 0 writes
        return p
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp.npz")
    np.savez(tmp, prompt_embeds=pe.embeds, negative_prompt_embeds=pe.negative,
             prompts=np.asarray(pe.prompts, dtype=np.str_))
    os.replace(tmp, p)
    return p


def _encoder_dirs(model_dir: str | os.PathLike) -> tuple[Path, Path]:
    """`text_encoder/` and `tokenizer/` of a diffusers pipeline folder, or an error saying what to do instead."""
    root = Path(model_dir)
    enc, tok = root / "text_encoder", root / "tokenizer"
    missing = [f"{d.name}/" for d in (enc, tok) if not d.is_dir()]
    if not missing and not (enc / "config.json").is_file():
        missing = ["text_encoder/config.json"]
    if not missing and not _weight_files(enc):
        missing = ["text_encoder weights (model.safetensors or pytorch_model.bin)"]
    if missing:
        raise FileNotFoundError(
            f"{root} has no {' or '.join(missing)}: encoding prompts needs the pipeline's text encoder. Either "
            f"download text_encoder/ and tokenizer/ into {root}, or {_precomputed_hint(root)}")
    return enc, tok


def _weight_files(enc: Path) -> list[Path]:
    return sorted(f for f in enc.iterdir() if f.is_file() and (f.suffix in (".safetensors", ".bin")
                                                               or f.name.endswith(".index.json")))


def _weights_variant(enc: Path) -> str | None:
    """`fp16` when the folder has only `model.fp16.*` weights (common in SD pipeline snapshots)."""
    if any((enc / n).is_file() for n in WEIGHT_NAMES):
        return None
    return "fp16" if any(".fp16." in f.name for f in _weight_files(enc)) else None


def _import_encoder():
    """torch and the transformers CLIP classes, or an error naming the extra."""
    try:
        import torch
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError as e:
        raise ImportError(f"encoding prompts needs torch and transformers ({e}): {EXTRA_HINT}; or "
                          f"{_precomputed_hint()}") from e
    return torch, CLIPTextModel, CLIPTokenizer


def encode_prompts(model_dir: str | os.PathLike, prompts: Sequence[str], negative_prompt: str = "",
                   batch: int = 32, length: int = MAX_LENGTH) -> PromptEmbeddings:
    """Encode prompts (and the negative prompt) with the folder's own CLIP `text_encoder/` and `tokenizer/`:
    padded to `length` tokens, truncated, `last_hidden_state` in float32, as the SD pipelines do."""
    prompts = [str(s) for s in prompts]
    if not prompts:
        raise ValueError("no prompts to encode")
    enc_dir, tok_dir = _encoder_dirs(model_dir)
    torch, CLIPTextModel, CLIPTokenizer = _import_encoder()
    # 1. tokenizer and encoder from the local folder only (never the hub)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    model = CLIPTextModel.from_pretrained(str(enc_dir), local_files_only=True, variant=_weights_variant(enc_dir))
    model = model.float().eval()
    use_mask = bool(getattr(model.config, "use_attention_mask", False))

    def run(texts: list[str]) -> np.ndarray:
        # 2. SD tokenisation: pad to max_length, truncate; the mask only where the config asks for it
        tokens = tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        mask = tokens.attention_mask if use_mask else None
        with torch.no_grad():
            out = model(tokens.input_ids, attention_mask=mask)
        return out.last_hidden_state.float().cpu().numpy()

    # 3. note prompts longer than the window (the pipelines truncate them too)
    lengths = [len(ids) for ids in tokenizer(prompts, truncation=False).input_ids]
    long = [s for s, k in zip(prompts, lengths) if k > length]
    if long:
        print(f"text: {len(long)} prompt(s) longer than {length} tokens are truncated, e.g. {long[0][:60]!r}",
              flush=True)
    # 4. encode in batches, then the negative prompt once
    print(f"text: encoding {len(prompts)} prompts with {enc_dir} (hidden size {model.config.hidden_size})",
          flush=True)
    embeds = np.concatenate([run(prompts[i:i + batch]) for i in range(0, len(prompts), batch)])
    negative = run([negative_prompt])
    return PromptEmbeddings(tuple(prompts), embeds, negative, source=str(enc_dir))


def cache_key(model_dir: str | os.PathLike, prompts: Sequence[str], negative_prompt: str = "",
              length: int = MAX_LENGTH) -> str:
    """sha256 of the prompts, the negative prompt and the encoder/tokenizer file names and sizes."""
    enc_dir, tok_dir = _encoder_dirs(model_dir)
    files = [[d.name, f.name, f.stat().st_size] for d in (enc_dir, tok_dir)
             for f in sorted(d.iterdir()) if f.is_file()]
    blob = json.dumps({"version": CACHE_VERSION, "prompts": list(prompts), "negative": negative_prompt,
                       "length": length, "files": files})
    return hashlib.sha256(blob.encode()).hexdigest()


def _check_context_dim(pe: PromptEmbeddings, context_dim: int | None, where: str) -> None:
    if context_dim is not None and pe.context_dim != context_dim:
        raise ValueError(f"{where} gives embeddings of shape (n, {pe.length}, {pe.context_dim}); the UNet expects "
                         f"(n, {pe.length}, {context_dim}) (cross-attention dim {context_dim})")


def prompt_embeddings(prompts_file: str | os.PathLike | None, embeds_file: str | os.PathLike | None,
                      model_dir: str | os.PathLike | None, workdir: str | os.PathLike | None,
                      context_dim: int | None, negative_prompt: str = "") -> PromptEmbeddings:
    """The embeddings a run uses: `embeds_file` when given, else `prompts_file` encoded with `model_dir`'s text
    encoder and cached as `workdir/prompt_embeds_<key>.npz`."""
    # 1. precomputed embeddings win
    if embeds_file:
        pe = load_prompt_embeds(embeds_file, context_dim=context_dim)
        note = " (prompts_file ignored)" if prompts_file else ""
        print(f"text: {pe.num_prompts} prompt embeddings {pe.embeds.shape[1:]} from {embeds_file}{note}",
              flush=True)
        return pe
    if not prompts_file:
        raise ValueError(f"no prompts: set a prompts file (one prompt per line), or {_precomputed_hint(model_dir)}")
    prompts = read_prompts(prompts_file)
    if model_dir is None:
        raise ValueError(f"{len(prompts)} prompts from {prompts_file} but no model folder to encode them with; "
                         f"{_precomputed_hint()}")
    # 2. the cache of an earlier encoding of the same prompts with the same encoder
    key = cache_key(model_dir, prompts, negative_prompt)
    cache = Path(workdir) / f"prompt_embeds_{key[:16]}.npz" if workdir is not None else None
    if cache is not None and cache.is_file():
        pe = load_prompt_embeds(cache)
        if list(pe.prompts) == prompts:
            _check_context_dim(pe, context_dim, f"the text encoder in {model_dir}")
            print(f"text: {pe.num_prompts} prompt embeddings {pe.embeds.shape[1:]} from cache {cache}", flush=True)
            return dataclasses.replace(pe, source=f"{Path(model_dir) / 'text_encoder'} (cache {cache.name})")
        print(f"text: cache {cache} holds other prompts; encoding again", flush=True)
    # 3. encode, check the width against the UNet, cache
    pe = encode_prompts(model_dir, prompts, negative_prompt=negative_prompt)
    _check_context_dim(pe, context_dim, f"the text encoder in {model_dir}")
    if cache is not None:
        save_prompt_embeds(cache, pe)
        print(f"text: {pe.num_prompts} prompt embeddings {pe.embeds.shape[1:]} cached in {cache}", flush=True)
    return pe


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m tmpq_jax.text MODEL_DIR PROMPTS.txt OUT.npz`: precompute embeddings for `--config.prompt_embeds`."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("model_dir", help="diffusers SD pipeline folder with text_encoder/ and tokenizer/")
    ap.add_argument("prompts", help="prompt file, one per line")
    ap.add_argument("out", help="output .npz")
    ap.add_argument("--negative_prompt", default="", help='negative prompt (default "")')
    ap.add_argument("--batch", type=int, default=32)
    a = ap.parse_args(argv)
    pe = encode_prompts(a.model_dir, read_prompts(a.prompts), negative_prompt=a.negative_prompt, batch=a.batch)
    save_prompt_embeds(a.out, pe)
    print(f"text: wrote {pe.num_prompts} prompt embeddings {pe.embeds.shape[1:]} to {a.out}", flush=True)


if __name__ == "__main__":
    main()
