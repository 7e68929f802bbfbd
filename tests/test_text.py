"""Text conditioning: prompt files, precomputed embeddings, the CLIP encoder path and its cache."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tmpq_jax import text

ROOT = Path(__file__).resolve().parents[1]
L, D = 77, 16


def embeds_file(path, n=3, length=L, d=D, negative=None, **extra):
    rng = np.random.default_rng(0)
    arrays = {"prompt_embeds": rng.normal(size=(n, length, d)).astype(np.float32), **extra}
    if negative is not None:
        arrays["negative_prompt_embeds"] = rng.normal(size=(negative, length, d)).astype(np.float32)
    np.savez(path, **arrays)
    return path, arrays


# --- prompt files ---------------------------------------------------------------------------------------------

def test_read_prompts_skips_comments_and_blanks(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# header\n\n  a red apple  \n#skip me\nblue sky\n\n")
    assert text.read_prompts(f) == ["a red apple", "blue sky"]


def test_read_prompts_errors_name_the_file(tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match="empty.txt"):
        text.read_prompts(f)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        text.read_prompts(tmp_path / "nope.txt")


def test_smoke_prompt_list():
    prompts = text.read_prompts(ROOT / "experiments" / "prompts" / "smoke.txt")
    assert len(prompts) >= 8 and len(set(prompts)) == len(prompts)


# --- precomputed embeddings -----------------------------------------------------------------------------------

def test_load_good_file_and_round_trip(tmp_path):
    f, a = embeds_file(tmp_path / "e.npz", n=3, negative=3)
    pe = text.load_prompt_embeds(f, context_dim=D)
    assert pe.prompts == ("embeds[0]", "embeds[1]", "embeds[2]")
    assert pe.embeds.dtype == np.float32 and pe.embeds.shape == (3, L, D)
    np.testing.assert_array_equal(pe.embeds, a["prompt_embeds"])
    np.testing.assert_array_equal(pe.negative, a["negative_prompt_embeds"])
    # save -> load keeps arrays, names and digest
    out = text.save_prompt_embeds(tmp_path / "sub" / "out.npz", pe)
    back = text.load_prompt_embeds(out, context_dim=D)
    assert back.prompts == pe.prompts and back.digest() == pe.digest()
    # rows(n): sample i uses prompt i % P
    cond, uncond = pe.rows(5)
    np.testing.assert_array_equal(cond[4], pe.embeds[1])
    assert uncond.shape == (5, L, D)


def test_negative_broadcast_and_names(tmp_path):
    f, a = embeds_file(tmp_path / "e.npz", n=4, negative=1, prompts=np.array(["a", "b", "c", "d"]))
    pe = text.load_prompt_embeds(f)
    assert pe.negative.shape == (4, L, D) and pe.prompts == ("a", "b", "c", "d")
    for i in range(4):
        np.testing.assert_array_equal(pe.negative[i], a["negative_prompt_embeds"][0])


def test_missing_negative_is_zeros(tmp_path):
    f, _ = embeds_file(tmp_path / "e.npz", n=2)
    pe = text.load_prompt_embeds(f)
    assert not pe.negative.any() and pe.negative.shape == (2, L, D)


def test_digest_changes_with_content(tmp_path):
    f, _ = embeds_file(tmp_path / "e.npz", n=2, negative=1)
    pe = text.load_prompt_embeds(f)
    other = text.PromptEmbeddings(pe.prompts, pe.embeds + 1, pe.negative, source="x")
    renamed = text.PromptEmbeddings(("x", "y"), pe.embeds, pe.negative)
    assert len({pe.digest(), other.digest(), renamed.digest()}) == 3
    assert text.PromptEmbeddings(pe.prompts, pe.embeds, pe.negative, source="y").digest() == pe.digest()


@pytest.mark.parametrize("kind, pattern", [
    ("wrong_d", r"prompt_embeds has shape \(2, 77, 12\); the UNet expects \(n, 77, 16\)"),
    ("wrong_len", r"prompt_embeds has shape \(2, 64, 16\); the UNet expects \(n, 77, 16\)"),
    ("wrong_ndim", r"prompt_embeds has shape \(2, 16\); the UNet expects \(n, 77, 16\)"),
    ("nan", r"prompt_embeds has 1 non-finite"),
    ("neg_nan", r"negative_prompt_embeds has 1 non-finite"),
    ("neg_shape", r"negative_prompt_embeds has shape \(3, 77, 16\); the UNet expects \(2, 77, 16\) or \(1, 77, 16\)"),
    ("missing_key", r"prompt_embeds missing \(keys found: \['embeds'\]\)"),
    ("names", r"prompts has 1 entries for 2 rows"),
])
def test_load_errors_name_key_and_shape(tmp_path, kind, pattern):
    rng = np.random.default_rng(1)
    good = rng.normal(size=(2, L, D)).astype(np.float32)
    with_nan = good.copy()
    with_nan[1, 5, 3] = np.nan
    neg_nan = np.zeros((1, L, D), np.float32)
    neg_nan[0, 2, 3] = np.nan
    arrays = {
        "wrong_d": {"prompt_embeds": good[..., :12]},
        "wrong_len": {"prompt_embeds": good[:, :64]},
        "wrong_ndim": {"prompt_embeds": good[:, 0]},
        "nan": {"prompt_embeds": with_nan},
        "neg_nan": {"prompt_embeds": good, "negative_prompt_embeds": neg_nan},
        "neg_shape": {"prompt_embeds": good, "negative_prompt_embeds": np.zeros((3, L, D))},
        "missing_key": {"embeds": good},
        "names": {"prompt_embeds": good, "prompts": np.array(["only one"])},
    }[kind]
    f = tmp_path / "bad.npz"
    np.savez(f, **arrays)
    with pytest.raises(ValueError, match=pattern):
        text.load_prompt_embeds(f, context_dim=D)


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        text.load_prompt_embeds(tmp_path / "missing.npz")


def test_prompt_embeddings_from_file(tmp_path, capsys):
    f, a = embeds_file(tmp_path / "e.npz", n=2, negative=1)
    pe = text.prompt_embeddings(None, f, None, tmp_path, context_dim=D)
    np.testing.assert_array_equal(pe.embeds, a["prompt_embeds"])
    assert "from" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"the UNet expects \(n, 77, 768\)"):
        text.prompt_embeddings(None, f, None, tmp_path, context_dim=768)


def test_prompt_embeddings_needs_prompts_or_embeds(tmp_path):
    with pytest.raises(ValueError, match="prompt_embeds"):
        text.prompt_embeddings(None, None, tmp_path, tmp_path, context_dim=D)


# --- the CLIP encoder path ------------------------------------------------------------------------------------

def bytes_to_unicode_chars():
    """The 256 printable stand-ins byte-level BPE uses for bytes (GPT-2/CLIP convention)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [chr(b) for b in keep], 0
    for b in range(256):
        if b not in keep:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """A tiny SD pipeline folder: `tokenizer/` (vocab.json, merges.txt, config) and a random `text_encoder/`."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("sd")
    # 1. tokenizer files as SD pipeline folders ship them
    chars = bytes_to_unicode_chars()
    merges = [("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"),
              ("r", "e"), ("re", "d</w>")]
    vocab = [*chars, *(c + "</w>" for c in chars), *(a + b for a, b in merges), "<|startoftext|>", "<|endoftext|>"]
    tok = root / "tokenizer"
    tok.mkdir()
    (tok / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (tok / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    (tok / "special_tokens_map.json").write_text(json.dumps(special))
    (tok / "tokenizer_config.json").write_text(json.dumps({**special, "model_max_length": 77,
                                                           "tokenizer_class": "CLIPTokenizer"}))
    # 2. a random one-layer CLIP text encoder
    cfg = transformers.CLIPTextConfig(vocab_size=len(vocab), hidden_size=D, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=32, max_position_embeddings=77,
                                      bos_token_id=len(vocab) - 2, eos_token_id=len(vocab) - 1,
                                      pad_token_id=len(vocab) - 1)
    torch.manual_seed(0)
    transformers.CLIPTextModel(cfg).eval().save_pretrained(root / "text_encoder")
    return root


def reference_encoding(folder, prompts):
    """last_hidden_state computed directly with transformers, as the SD pipeline does."""
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    model = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).last_hidden_state.numpy()


def test_encode_prompts_matches_reference(sd_folder):
    prompts = ["the cat", "a red dog", "the dog"]
    pe = text.encode_prompts(sd_folder, prompts, batch=2)
    assert pe.embeds.shape == (3, 77, D) and pe.negative.shape == (3, 77, D)
    assert pe.embeds.dtype == np.float32 and np.isfinite(pe.embeds).all()
    np.testing.assert_allclose(pe.embeds, reference_encoding(sd_folder, prompts), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pe.negative[0], reference_encoding(sd_folder, [""])[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(pe.negative[0], pe.negative[2])
    # different prompts differ; the same prompts give the same embeddings
    assert not np.allclose(pe.embeds[0], pe.embeds[1]) and not np.allclose(pe.embeds[0], pe.negative[0])
    again = text.encode_prompts(sd_folder, prompts)
    assert again.digest() == pe.digest()
    # a negative prompt changes the unconditional rows only
    neg = text.encode_prompts(sd_folder, prompts, negative_prompt="red")
    np.testing.assert_array_equal(neg.embeds, pe.embeds)
    assert not np.allclose(neg.negative, pe.negative)


def test_prompt_embeddings_caches_encoding(sd_folder, tmp_path, monkeypatch, capsys):
    import transformers

    pf = tmp_path / "prompts.txt"
    pf.write_text("the cat\na red dog\n")
    work = tmp_path / "work"
    pe = text.prompt_embeddings(pf, None, sd_folder, work, context_dim=D)
    caches = list(work.glob("prompt_embeds_*.npz"))
    assert len(caches) == 1 and "cached in" in capsys.readouterr().out

    # a second run must not construct the encoder
    def boom(*a, **k):
        raise AssertionError("text encoder constructed although the cache exists")

    monkeypatch.setattr(transformers.CLIPTextModel, "from_pretrained", boom)
    again = text.prompt_embeddings(pf, None, sd_folder, work, context_dim=D)
    assert again.digest() == pe.digest() and "from cache" in capsys.readouterr().out
    # other prompts or another negative prompt are another cache entry (and need the encoder)
    with pytest.raises(AssertionError, match="constructed"):
        text.prompt_embeddings(pf, None, sd_folder, work, context_dim=D, negative_prompt="red")
    # a UNet of another width is refused with both shapes
    with pytest.raises(ValueError, match=r"\(n, 77, 16\); the UNet expects \(n, 77, 768\)"):
        text.prompt_embeddings(pf, None, sd_folder, work, context_dim=768)


def test_missing_text_encoder_points_to_prompt_embeds(tmp_path):
    (tmp_path / "tokenizer").mkdir()
    pf = tmp_path / "p.txt"
    pf.write_text("a cat\n")
    with pytest.raises(FileNotFoundError, match=r"no text_encoder/.*--config\.prompt_embeds=FILE\.npz"):
        text.prompt_embeddings(pf, None, tmp_path, tmp_path, context_dim=D)
    with pytest.raises(FileNotFoundError, match="prompt_embeds"):
        text.encode_prompts(tmp_path, ["a cat"])


def test_missing_packages_name_the_extra(sd_folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[text\]"'):
        text.encode_prompts(sd_folder, ["a cat"])


def test_cli_writes_loadable_file(sd_folder, tmp_path):
    pf = tmp_path / "p.txt"
    pf.write_text("the cat\nthe dog\n")
    out = tmp_path / "e.npz"
    text.main([str(sd_folder), str(pf), str(out)])
    pe = text.load_prompt_embeds(out, context_dim=D)
    assert pe.prompts == ("the cat", "the dog")
    np.testing.assert_allclose(pe.embeds, reference_encoding(sd_folder, ["the cat", "the dog"]), rtol=1e-5, atol=1e-6)
