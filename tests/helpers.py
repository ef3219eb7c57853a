"""Shared test helpers: tiny random models, offline tokenizers, calibration text, paths.

Every test file imports what it needs from here (never from another test file)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# the project's full data folder (../shared/data); TASA_SHARED_DATA overrides
SHARED_DATA = Path(os.environ.get("TASA_SHARED_DATA", REPO.parent / "shared" / "data"))
SHARED_DATA_MISSING = (f"shared data folder {SHARED_DATA} is missing (set TASA_SHARED_DATA to a "
                       f"folder laid out like ../shared/data)")


# ---- tiny random models ---------------------------------------------------------------------------

def tiny_llama(seed=0, hidden=128, inter=256):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2(seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return Qwen2ForCausalLM(cfg).eval()


def tiny_gemma3(seed=0):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                           num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=32, max_position_embeddings=512, sliding_window=16,
                           layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    return Gemma3ForCausalLM(cfg).eval()


# ---- tokenizers and text --------------------------------------------------------------------------

class ByteTok:
    """A byte-level stand-in tokenizer (ids < 256) so tiny models see real text."""

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.int64)[None]
        return type("Enc", (), {"input_ids": ids})()


def byte_tokenizer():
    """A fast HF tokenizer with one token per UTF-8 byte (ids < 257), built offline."""
    from tokenizers import Tokenizer, decoders, models as tmodels, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    t = Tokenizer(tmodels.BPE(vocab=vocab, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    t.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>")


def rtn_folder(path, tokenizer=None, seed: int = 0):
    """A saved tasa folder at ``path``: the tiny LLaMA (seeded), uniform 4-bit RTN with groups of
    32, with ``tokenizer`` (default the byte tokenizer). Returns ``path``."""
    import tasa

    torch.manual_seed(seed)
    model = tasa.quantize(tiny_llama(), None, bits=4, method="rtn", group_size=32, progress=False)
    model.save_pretrained(path)
    (tokenizer or byte_tokenizer()).save_pretrained(path)
    return path


def real_calib(n=8, seqlen=64, seed=0):
    """``n`` byte-tokenized calibration sequences from the slices shipped with tasa."""
    from tasa import corpora

    pools = corpora.calibration_pools()
    return corpora.calibration_batch(ByteTok(), pools, n, seqlen, seed=seed)


def shipped_data_folder(root) -> Path:
    """A data folder laid out like ../shared/data holding the slices shipped in tasa/data: each
    data key's slice at the first path of :data:`tasa.corpora.DATA_FILES` with the slice's file
    type (the WikiText-2 slice is joined text, not ``wiki.test.raw``'s one row per line). For
    code that wants a folder but needs only a little data."""
    from tasa import corpora

    root = Path(root)
    for key, (shipped, files) in corpora.DATA_FILES.items():
        dst = root / next(f for f in files if Path(f).suffix == Path(shipped).suffix)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(corpora.shipped_file(key), dst)
    return root


def write_legacy_folder(model, path, plan, meta=None) -> Path:
    """A folder as tasa wrote it before transformers folders ("layout 1": tasa_config.json +
    model.safetensors with shared tensors stored once), to check that such folders still load
    and convert. A copy of that writer, kept here because the library no longer writes it."""
    import json

    from safetensors.torch import save_file

    import tasa_ext
    from tasa.quant import plan_to_dict

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    seen, tensors, aliases = {}, {}, {}
    for k, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in seen:
            aliases[k] = seen[key]
            continue
        seen[key] = k
        tensors[k] = t.detach().contiguous().cpu()
    save_file(tensors, str(path / "model.safetensors"),
              metadata={"format": "pt", "tasa_format_version": str(tasa_ext.FORMAT_VERSION)})
    layers = {k: v.to_dict() for k, v in plan.items()}
    cfg = {"format_version": tasa_ext.FORMAT_VERSION,
           "plan": {"format_version": tasa_ext.FORMAT_VERSION, "layers": layers},
           "model_config": model.config.to_dict(), "model_class": type(model).__name__,
           "base_model": "legacy-test", "aliases": aliases, "meta": meta or {}}
    (path / "tasa_config.json").write_text(json.dumps(cfg, default=str))
    return path
