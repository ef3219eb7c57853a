"""A corpus of crafted checkpoints: a valid tasa folder (tiny LLaMA, packed embedding) with one
thing changed the way an attacker or a damaged disk would. Every one must be refused with one
`tasa:` ValueError before any kernel runs -- never a crash, a traceback from a library, or a
model that loads. Each craft re-signs the tensors it touches (fresh per-tensor sha256 in the
header, config.json's file checksums dropped) so that it reaches the checks behind the
checksums."""
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import tasa

from helpers import tiny_llama


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    tasa.quantize(model, None, bits=4, method="rtn", group_size=32, out=d, progress=False)
    return d


def _resave(folder, state):
    save_file(state, str(folder / "model.safetensors"), metadata=tasa.hf.tensor_hashes(state))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"].pop("checksums", None)
    (folder / "config.json").write_text(json.dumps(cfg))


def _edit_state(fn):
    def craft(folder):
        state = load_file(str(folder / "model.safetensors"))
        fn(state)
        _resave(folder, state)
    return craft


def _edit_config(fn):
    def craft(folder):
        cfg = json.loads((folder / "config.json").read_text())
        fn(cfg)
        (folder / "config.json").write_text(json.dumps(cfg))
    return craft


def _raw(fn):
    def craft(folder):
        f = folder / "model.safetensors"
        f.write_bytes(fn(f.read_bytes()))
    return craft


UP = "model.layers.0.mlp.up_proj"
EMB = "model.embed_tokens"


def _set(key, value_fn):
    return _edit_state(lambda s: s.__setitem__(key, value_fn(s[key])))


def _gtable_offsets(g):
    g = g.clone()
    g[1, 1] += 5
    return g


def _perm_repeat(s):
    s[f"{UP}.perm"] = torch.zeros(128, dtype=torch.int32)


def _header_offsets_beyond(b):
    n = struct.unpack("<Q", b[:8])[0]
    h = json.loads(b[8:8 + n])
    k = next(k for k in h if k != "__metadata__")
    h[k]["data_offsets"][1] += 10 ** 9
    hb = json.dumps(h).encode()
    return struct.pack("<Q", len(hb)) + hb + b[8 + n:]


CORPUS = {
    "header length beyond the file": (_raw(lambda b: struct.pack("<Q", 2 ** 40) + b[8:]),
                                      "not a safetensors file|header"),
    "header not JSON": (_raw(lambda b: b[:8] + b"{" * 8 + b[16:]), "corrupt|header|JSON"),
    "truncated file": (_raw(lambda b: b[: len(b) // 2]), ""),
    "tensor offsets beyond the file": (_raw(_header_offsets_beyond), ""),
    "qweight stored as float": (_set(f"{UP}.qweight", lambda t: t.float()), "qweight is F32"),
    "scales of the wrong shape": (_set(f"{UP}.scales", lambda t: t[:1]), "scales has shape"),
    "group table offsets shifted": (_set(f"{UP}.gtable", _gtable_offsets), "gtable"),
    "NaN zero point": (_set(f"{UP}.zeros", lambda t: t.index_fill(1, torch.tensor([0]),
                                                                   float("nan"))), "NaN"),
    "perm smuggled in": (_edit_state(_perm_repeat), "unexpected"),
    "extra tensor": (_edit_state(lambda s: s.__setitem__("evil", torch.zeros(3))), "unexpected"),
    "embedding table of another vocabulary": (_set(f"{EMB}.qweight", lambda t: t[:-1].clone()),
                                              "embed_tokens.qweight has shape"),
    "fp32 head beside the tied table": (_edit_state(lambda s: s.__setitem__(
        "lm_head.weight", torch.zeros(512, 128))), "unexpected"),
    "embedding entry names a linear": (_edit_config(lambda c: c["quantization_config"][
        "embedding"].__setitem__("module", UP)), "not this model's input embedding"),
    "embedding widths changed": (_edit_config(lambda c: c["quantization_config"]["embedding"]
                                              .__setitem__("bits", [4, 4, 4, 4])),
                                 "embed_tokens.qweight has shape"),
    "checksum of another file": (_edit_config(lambda c: c["quantization_config"].__setitem__(
        "checksums", {"model.safetensors": "0" * 64})), "does not match the sha256"),
}


@pytest.mark.parametrize("name", list(CORPUS))
def test_crafted_checkpoint_is_refused(base, tmp_path, name):
    import shutil

    craft, msg = CORPUS[name]
    folder = tmp_path / "f"
    shutil.copytree(base, folder)
    craft(folder)
    with pytest.raises(ValueError) as e:
        tasa.load(folder)
    assert str(e.value).startswith("tasa:"), e.value
    if msg:
        import re
        assert re.search(msg, str(e.value)), e.value


def test_the_uncrafted_base_loads(base):
    m = tasa.load(base)
    assert isinstance(m.lm_head, tasa.layers.TasaTiedHead)
