"""tasa.measurement: the typed, versioned measurement file. The committed measurements of the
reproduction load and round-trip without losing a key, and still reproduce the allocations of
the committed TASA rows; other kinds/versions are refused; a settings mismatch names every
differing setting."""
import copy
import json

import pytest

from tasa import defaults, pipeline
from tasa.measurement import (MEASUREMENT_KIND, MEASUREMENT_VERSION, Measurement, MixtureResult,
                              SensitivityResult, check_settings, settings_diff)

from helpers import REPO

REPRO = REPO / "benchmarks" / "results" / "reproduction"
COMMITTED = sorted(REPRO.glob(f"*/{defaults.MEASUREMENT_NAME}"))


def small(**over) -> dict:
    """A complete version-1 measurement document, small enough to write by hand."""
    d = {"kind": MEASUREMENT_KIND, "version": MEASUREMENT_VERSION,
         "config": {"model": "tiny", "seed": 0, "sens_bits": 3},
         "format_version": 1, "created": "2026-01-01 00:00 UTC",
         "linears": {"b0.q": {"n_out": 64, "k_in": 64, "group_size": 32, "mode": "asym"}},
         "units": {"block0": {"block": 0, "linears": ["b0.q"]}},
         "data": {"gen_calib": 3},
         "mixture": {"alpha_star": 0.4, "f_star": 1.5, "alpha_searched": True, "best_on_grid": 0.5,
                     "table": [{"alpha": 0.0, "f": 2.0, "f_rel": 1.3}], "curve": {},
                     "layer_alpha": {"b0.q": 0.4}, "shared_inputs": {"b0.q": ["b0.q"]},
                     "group_error_widths": [2, 3, 4, 8],
                     "group_errors": {"b0.q": [[4.0, 2.0, 1.0, 0.1], [3.0, 1.5, 0.7, 0.05]]},
                     "tokens": {"gen": 10}, "seconds": 1.0},
         "sensitivity": {"objectives": ["ppl", "math"], "objective_data": [], "bits": 3,
                         "delta": {"block0": {"ppl": 0.1, "math": 0.2}}, "seconds": 2.0,
                         "base": {"ppl": 3.0, "math": 2.0}, "illusion": [], "complete": True}}
    d.update(over)
    return d


# ---- the committed measurements --------------------------------------------------------------------

@pytest.fixture(scope="module", params=COMMITTED, ids=lambda p: p.parent.name)
def committed(request):
    raw = json.loads(request.param.read_text())
    return request.param, raw, Measurement.load(request.param)


def test_committed_measurements_present():
    assert COMMITTED, f"no {defaults.MEASUREMENT_NAME} under {REPRO}"


def test_committed_measurement_round_trips(committed, tmp_path):
    path, raw, m = committed
    assert m.to_dict() == raw                              # no key lost, none added
    assert m.extra == {} and m.mixture.extra == {} and m.sensitivity.extra == {}
    assert Measurement.load(path.parent).to_dict() == raw  # a folder works too
    assert m.complete and isinstance(m.mixture, MixtureResult)
    assert isinstance(m.sensitivity, SensitivityResult)
    assert set(m.sensitivity.delta) == set(m.units)
    prof = m.sensitivity.profile(list(m.units))
    assert list(prof) == m.sensitivity.objectives
    assert all(len(v) == len(m.units) for v in prof.values())
    m.save(tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text()) == raw


def test_committed_measurement_reproduces_the_committed_allocations(committed):
    """Allocation from the typed measurement gives exactly the widths (and average bits) of
    every committed TASA row computed from that measurement."""
    path, _, m = committed
    meta = json.loads((path.parent / "meta.json").read_text())
    rows = [json.loads(p.read_text()) for p in sorted((path.parent / "rows").glob("*.json"))
            if not p.name.endswith((".raw.json", ".gsm8k.json"))]
    tasa_rows = [r for r in rows if r["spec"]["kind"] == "tasa"]
    assert tasa_rows
    for r in tasa_rows:
        spec, st = r["spec"], r.get("settings", meta["settings"])
        A = pipeline.allocate(m, spec["bits"], spec.get("beta", st["beta"]),
                              widths=tuple(st["widths"]), intra=spec.get("intra", True))
        assert A["item_bits"] == r["item_bits"], r["name"]
        assert A["summary"]["avg_bits"] == r["avg_bits"], r["name"]


# ---- refusing what is not a version-1 measurement ----------------------------------------------------

@pytest.mark.parametrize("change,message", [
    (dict(kind="tasa.plan"), r"not a version-1 tasa measurement \(kind 'tasa.plan', version 1\)"),
    (dict(version=2), r"not a version-1 tasa measurement \(kind 'tasa.measurement', version 2\)"),
    (dict(kind=None, version=None), r"kind None, version None"),
])
def test_other_kind_or_version_refused(tmp_path, change, message):
    d = small(**change)
    d = {k: v for k, v in d.items() if v is not None}
    p = tmp_path / defaults.MEASUREMENT_NAME
    p.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=message) as ei:
        Measurement.load(p)
    assert str(p) in str(ei.value)                         # names the file


def test_incomplete_documents_refused(tmp_path):
    d = small()
    del d["config"]
    with pytest.raises(ValueError, match="lacks its config or format_version"):
        Measurement.from_dict(d)
    d = small()
    del d["mixture"]["alpha_star"]
    with pytest.raises(ValueError, match=r"mixture result lacks \['alpha_star'\]"):
        Measurement.from_dict(d)
    with pytest.raises(FileNotFoundError, match="not found"):
        Measurement.load(tmp_path / "nothing-here")


def test_unknown_keys_are_kept_and_written_back(tmp_path):
    d = small(future_top={"x": 1})
    d["mixture"]["future_mix"] = [1, 2]
    d["sensitivity"]["future_sens"] = "y"
    m = Measurement.from_dict(d)
    assert m.extra == {"future_top": {"x": 1}} and m.mixture.extra == {"future_mix": [1, 2]}
    m.save(tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text()) == d


def test_partial_measurement_and_modified_copy():
    d = small()
    d["sensitivity"]["complete"] = False
    del d["sensitivity"]["illusion"]
    m = Measurement.from_dict(d)
    assert not m.complete and m.to_dict() == d             # illusion stays absent until computed
    assert not Measurement.from_dict({k: v for k, v in d.items() if k != "sensitivity"}).complete
    full = Measurement.from_dict(small())
    c = copy.deepcopy(full)
    c.sensitivity.delta["block0"]["ppl"] = 9.0
    assert full.sensitivity.delta["block0"]["ppl"] == 0.1  # the copy is independent


# ---- settings checks ---------------------------------------------------------------------------------

def test_settings_diff_and_check_name_every_differing_key():
    rec = {"model": "tiny", "seed": 0, "sens_bits": 3, "n_gen": 16}
    cur = {"model": "tiny", "seed": 1, "sens_bits": 2, "mix_seqlen": 512}
    assert settings_diff(rec, cur) == ["mix_seqlen", "n_gen", "seed", "sens_bits"]
    assert settings_diff(rec, dict(rec)) == []
    check_settings(rec, dict(rec), "x")                    # equal: nothing raised
    with pytest.raises(ValueError) as ei:
        check_settings(rec, cur, "the file f.json", "use another --out")
    msg = str(ei.value)
    assert msg.startswith("tasa: the file f.json was made with other settings")
    for part in ("seed: 0 there, 1 now", "sens_bits: 3 there, 2 now", "n_gen: 16 there, None now",
                 "mix_seqlen: None there, 512 now"):
        assert part in msg, part
    assert "model" not in msg and msg.endswith("; use another --out")


def test_check_settings_names_a_setting_left_out_at_its_default():
    """A fingerprint leaves a setting out at its first value (files written before it existed
    still match): the error names that value and, either way round, the flags that reuse the
    file (an old RTN-probed, NLL-scored measurement under today's defaults: --sens-method rtn
    --sens-scoring nll)."""
    with pytest.raises(ValueError) as ei:
        check_settings({"seed": 0, "sens_scoring": "kl"}, {"seed": 0}, "m.json")
    assert "sens_scoring: 'kl' there, 'nll' (unrecorded: " in str(ei.value)
    assert "to reuse it give --sens-scoring kl" in str(ei.value)
    with pytest.raises(ValueError) as ei:
        check_settings({"seed": 0}, {"seed": 0, "sens_scoring": "kl", "sens_method": "gptq-mse"},
                       "m.json")
    msg = str(ei.value)
    assert "sens_scoring: 'nll' (unrecorded: the value before the setting existed) there, 'kl' now" in msg
    assert "sens_method: 'rtn' (unrecorded" in msg and "'gptq-mse' now" in msg
    assert "to reuse it give --sens-method rtn --sens-scoring nll" in msg


def test_measurement_check_settings_uses_its_config():
    m = Measurement.from_dict(small())
    m.check_settings({"model": "tiny", "seed": 0, "sens_bits": 3}, "m")
    with pytest.raises(ValueError, match=r"\(seed: 0 there, 5 now\)"):
        m.check_settings({"model": "tiny", "seed": 5, "sens_bits": 3}, "m")
