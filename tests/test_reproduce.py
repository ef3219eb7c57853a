"""benchmarks/reproduce.py, the reproduction harness, on a tiny model: every row traces to a raw
JSON, the table is rebuilt from them, a rerun recomputes nothing, and results are deterministic
under fixed seeds. Data: the slices shipped with tasa, laid out as a data folder."""
import importlib.util
import json
import math
import re

import numpy as np
import pytest

from helpers import REPO, byte_tokenizer, shipped_data_folder, tiny_llama


def _load_harness():
    spec = importlib.util.spec_from_file_location("reproduce", REPO / "benchmarks" / "reproduce.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _load_harness_plain():
    import sys
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return _load_harness()
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return shipped_data_folder(tmp_path_factory.mktemp("data"))


@pytest.fixture
def harness(monkeypatch):
    pytest.importorskip("lm_eval")
    from tasa import models

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))   # as when run as a script

    monkeypatch.setattr(models, "load_model", lambda name, **k: (
        tiny_llama(seed=1), byte_tokenizer(), models.ModelInfo(name, "local")))
    return _load_harness()


ARGS = ["--models", "tiny", "--limit", "3", "--ppl-windows", "1", "--n-calib", "2", "--seqlen", "64",
        "--rows", "reference;RTN W3;GPTQ W4;TASA 3.8, beta=1 (ppl-only sensitivity)", "--bits", "3.8"]


def _run(harness, out, data_dir):
    assert harness.main(ARGS + ["--data", str(data_dir), "--out", str(out)]) == 0
    rows = {}
    for p in sorted((out / "tiny" / "rows").glob("*.json")):
        if not p.name.endswith(".raw.json"):
            rows[p.name] = json.loads(p.read_text())
    return rows


def _files(folder):
    """Every file under ``folder`` (path -> bytes), plots excepted (rebuilt on every call)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.suffix != ".png"}


def _without_later_calls(table: str) -> str:
    """The table minus the one thing a rerun may add: the "N later call(s), the last <date> at
    <commit>" note of a model's "first run" line (written when the date, to the minute, differs)."""
    return re.sub(r"; \d+ later call\(s\), the last [^\n]*? at \S+", "", table)


@pytest.mark.slow
def test_harness_rows_raw_json_table_and_determinism(harness, tmp_path, data_dir):
    r1 = _run(harness, tmp_path / "a", data_dir)
    names = {r["name"] for r in r1.values()}
    assert names == {"reference", "RTN W3", "GPTQ W4", "TASA 3.8, beta=1 (ppl-only sensitivity)"}
    for fname, r in r1.items():
        raw = tmp_path / "a" / "tiny" / "rows" / r["eval"]["raw"]
        samples = json.loads(raw.read_text())["samples"]
        assert {len(v) for v in samples.values()} == {3}          # the limit, per task
        assert r["eval"]["lm_eval"]["arc_easy"]["n"] == 3
    bits = {r["name"]: r["avg_bits"] for r in r1.values()}
    assert bits["reference"] is None
    assert bits["RTN W3"] < bits["TASA 3.8, beta=1 (ppl-only sensitivity)"] <= 3.8 < bits["GPTQ W4"]
    table = (tmp_path / "reproduction.md").read_text()
    for n in names:
        assert f"| {n} |" in table
    assert (tmp_path / "a" / "tiny_quality_vs_bits.png").is_file()
    # resume: a second call recomputes nothing (rows are read back), same table
    before = _files(tmp_path / "a")
    table_before = table

    def recompute(*a, **k):
        raise AssertionError("the rerun recomputed something that exists")

    from tasa import models, pipeline

    with pytest.MonkeyPatch.context() as mp:
        for owner, name in ((harness, "run_row"), (harness, "evaluate_row"), (pipeline, "measure"),
                            (models, "load_model")):
            mp.setattr(owner, name, recompute)
        assert harness.main(ARGS + ["--data", str(data_dir), "--out", str(tmp_path / "a")]) == 0
    after = _files(tmp_path / "a")
    assert after.keys() == before.keys()
    changed = sorted(k for k in before if before[k] != after[k])
    assert changed in ([], ["tiny/meta.json"]), changed       # meta.json may log the call
    table_after = (tmp_path / "reproduction.md").read_text()
    assert _without_later_calls(table_after) == _without_later_calls(table_before)
    assert table_after == table_before or "; 1 later call(s), the last " in table_after
    # determinism: a fresh run in another folder gives the same numbers
    r2 = _run(harness, tmp_path / "b", data_dir)
    for k in r1:
        for key in ("avg_bits", "item_bits", "alpha"):
            assert r1[k].get(key) == r2[k].get(key), (k, key)
        assert r1[k]["eval"]["lm_eval"] == r2[k]["eval"]["lm_eval"], k
        assert r1[k]["eval"]["wikitext2"]["ppl"] == r2[k]["eval"]["wikitext2"]["ppl"]


@pytest.mark.slow
def test_harness_refuses_mixed_settings_and_tables_every_model(harness, tmp_path, data_dir):
    out = tmp_path / "o"
    base = ["--data", str(data_dir), "--out", str(out), "--ppl-windows", "1", "--rows", "reference"]
    assert harness.main(["--models", "tiny", "--limit", "3"] + base) == 0
    meta = json.loads((out / "tiny" / "meta.json").read_text())
    assert meta["settings"]["limit"] == 3 and "--rows" not in meta["command"]
    row = json.loads((out / "tiny" / "rows" / "reference.json").read_text())
    assert row["settings"] == meta["settings"]
    # the same model with another subset size would mix incomparable rows: refused, nothing written
    with pytest.raises(SystemExit, match="limit: 3 there, 4 now"):
        harness.main(["--models", "tiny", "--limit", "4"] + base)
    assert json.loads((out / "tiny" / "meta.json").read_text())["settings"]["limit"] == 3
    # another model with its own settings: the table keeps both sections, each with its command
    assert harness.main(["--models", "tiny2", "--limit", "2"] + base) == 0
    table = (tmp_path / "reproduction.md").read_text()
    assert table.index("## tiny\n") < table.index("## tiny2\n")
    assert "--models tiny --limit 3" in table and "--models tiny2 --limit 2" in table
    assert "subset: 3 items per task" in table and "subset: 2 items per task" in table


def test_per_model_presets_fill_only_options_not_given():
    mod = _load_harness_plain()
    ns = lambda **k: mod.argparse.Namespace(**{**{x: None for x in mod.DEFAULTS}, **k})
    q = mod.model_args(ns(), "qwen2.5-coder-0.5b")
    assert (q.limit, q.gsm8k_em, q.gsm8k_shots, q.extra_budgets) == (50, True, 5, ())
    s = mod.model_args(ns(), "smollm2-135m")
    assert (s.limit, s.gsm8k_em, s.ppl_windows, s.extra_budgets) == (100, False, 4, (3.81,))
    o = mod.model_args(ns(limit=7, gsm8k_em=False), "qwen2.5-coder-0.5b")   # the command line wins
    assert (o.limit, o.gsm8k_em, o.gsm8k_limit) == (7, False, 30)
    d = mod.model_args(ns(), "some-other-model")
    assert {k: getattr(d, k) for k in mod.DEFAULTS} == {**mod.DEFAULTS, "extra_budgets": ()}


def _nll_log(folder, name, nll):
    """A row's lm-eval sample log with the given per-item gold bits per byte; returns its name."""
    import math

    raw = f"{name}.raw.json"
    samples = {"gsm8k_nll": [{"doc_id": str(i), "bits_per_byte": f"[{-v * math.log(2) * 10}, 10]"}
                             for i, v in enumerate(nll)]}
    (folder / "rows" / raw).write_text(json.dumps({"samples": samples}))
    return raw


def test_paired_comparison_from_sample_logs(tmp_path):
    """per_item reads lm-eval's per-sample logs; paired() gives the mean paired difference, its
    standard error and the exact-match discordant counts -- checked against hand arithmetic."""
    import math

    mod = _load_harness_plain()
    (tmp_path / "rows").mkdir()

    def row(name, nll, em):
        raw = _nll_log(tmp_path, name, nll)
        gs = [{"doc_id": str(i), "filter": f, "exact_match": float(e) if f == "flexible-extract" else 0.0}
              for i, e in enumerate(em) for f in ("strict-match", "flexible-extract")]
        (tmp_path / "rows" / f"{name}.raw.gsm8k.json").write_text(json.dumps({"samples": {"gsm8k": gs}}))
        return {"name": name, "eval": {"raw": raw}}

    a = row("A", [1.0, 2.0, 3.0, 4.0], [1, 1, 0, 0])
    b = row("B", [1.5, 2.5, 3.0, 5.0], [0, 1, 1, 0])
    assert mod.per_item(tmp_path, a, "gsm8k_nll") == pytest.approx({"0": 1.0, "1": 2.0, "2": 3.0, "3": 4.0})
    assert mod.per_item(tmp_path, a, "gsm8k") == {"0": 1.0, "1": 1.0, "2": 0.0, "3": 0.0}
    d = [-0.5, -0.5, 0.0, -1.0]
    mean = sum(d) / 4
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / 3 / 4)
    s = mod.paired(tmp_path, a, b)
    assert f"{mean:+.4f} ± {se:.4f}" in s and "A lower on 3" in s and "4 items" in s
    assert "right on 1 item(s) B got wrong, wrong on 1 it got right" in s
    # a row without sample logs gives nothing rather than a made-up comparison
    assert mod.paired(tmp_path, a, {"name": "C", "eval": {"raw": "C.raw.json"}}) is None


def test_paired_seeds_against_hand_arithmetic(tmp_path):
    """paired_seeds: per item the mean over a config's seeds, then the paired difference with a
    95% t-interval; per seed pair the mean difference of the two rows of that seed."""
    import math

    mod = _load_harness_plain()
    (tmp_path / "rows").mkdir()

    def row(name, seed, nll):
        return {"name": f"{name}, seed {seed}", "spec": {"cal_seed": seed},
                "eval": {"raw": _nll_log(tmp_path, name, nll)}}

    A = [row("A0", 0, [1.0, 2.0, 3.0]), row("A1", 1, [1.2, 2.2, 2.6])]
    B = [row("B0", 0, [1.5, 2.0, 3.5]), row("B1", 1, [1.5, 2.6, 3.4])]
    r = mod.paired_seeds(tmp_path, A, B, "gsm8k_nll")
    d = [(1.0 + 1.2) / 2 - 1.5, (2.0 + 2.2) / 2 - 2.3, (3.0 + 2.6) / 2 - 3.45]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    assert r["mean"] == pytest.approx(mean) and r["ci"] == pytest.approx(4.303 * sd / math.sqrt(3))
    assert r["items"] == 3 and r["a_lower"] == 3
    s0, s1 = (-0.5 + 0 - 0.5) / 3, (-0.3 - 0.4 - 0.8) / 3
    assert r["per_seed"] == pytest.approx([s0, s1]) and r["seeds"] == 2
    assert r["seed_ci"] == pytest.approx(12.706 * abs(s0 - s1) / math.sqrt(2) / math.sqrt(2))
    text = mod.fmt_paired("A", "B", r, "b/B", True)
    assert "A lower on 3" in text and "within item noise" in text   # CI +-0.56 > |mean| 0.42
    tight = dict(r, ci=0.1)
    assert "beyond item noise but not seed noise" in mod.fmt_paired("A", "B", tight, "b/B", True)
    assert "beyond item and seed noise" in mod.fmt_paired("A", "B", dict(tight, seed_ci=0.05),
                                                          "b/B", True)
    one = {k: v for k, v in tight.items() if k not in ("seeds", "per_seed", "seed_mean", "seed_ci")}
    assert "seed noise not measured" in mod.fmt_paired("A", "B", one, "b/B", True)
    assert mod.config_of("TASA 3.5 code bits, seed 2") == "TASA 3.5 code bits"


def test_paper_suite_rows():
    mod = _load_harness_plain()
    rows = dict(mod.paper_rows(3.5, 0.5, seeds=(0, 1, 2), sweep=(3.25, 3.5), other_seeds=1))
    assert [n for n in rows if n.startswith("GPTQ W4")] == [f"GPTQ W4, seed {s}" for s in (0, 1, 2)]
    assert [n for n in rows if n.startswith("GPTQ W3")] == ["GPTQ W3, seed 0"]
    assert rows["TASA 3.5 code bits, seed 1"] == {"kind": "tasa", "bits": 3.5, "beta": 0.5,
                                                  "budget": "code", "cal_seed": 1}
    h = next(v for n, v in rows.items() if n.startswith("HIGGS"))
    assert h["scoring"] == "higgs" and h["alpha"] == 1.0 and h["budget"] == "code"
    assert [v["bits"] for v in rows.values() if v.get("sweep")] == [3.25, 3.5]
    rows = dict(mod.paper_rows(3.5, 0.5, seeds=(0,), sweep=(3.25, 3.5), sweep_seeds=(0, 1)))
    sw = {n: (v["bits"], v["cal_seed"]) for n, v in rows.items() if v.get("sweep")}
    assert sw == {"TASA sweep 3.250 storage bits": (3.25, 0), "TASA sweep 3.500 storage bits": (3.5, 0),
                  "TASA sweep 3.250 storage bits, seed 1": (3.25, 1),
                  "TASA sweep 3.500 storage bits, seed 1": (3.5, 1)}


def _fake_sweep_row(mdir, name, bits, seed, nll):
    """A sweep row as reproduce.py writes it, with a sample log of per-item (loglik, bytes)."""
    raw = name.replace(" ", "_").replace(",", "_") + ".raw.json"
    samples = [{"doc_id": i, "bits_per_byte": [-v * math.log(2) * 100, 100]} for i, v in enumerate(nll)]
    (mdir / "rows" / raw).write_text(json.dumps({"samples": {"gsm8k_nll": samples}}))
    row = {"name": name, "spec": {"kind": "tasa", "bits": bits, "budget": "storage",
                                  "cal_seed": seed, "sweep": True},
           "avg_bits": bits, "code_avg_bits": bits - 0.25,
           "eval": {"raw": raw, "wikitext2": {"ppl": 30.0},
                    "lm_eval": {"gsm8k_nll": {"bits_per_byte": sum(nll) / len(nll)}}}}
    (mdir / "rows" / (name.replace(" ", "_") + ".json")).write_text(json.dumps(row))


def _sweep_section(mod, mdir, tmp_path, n_items) -> list:
    """The paper section's lines for the fake sweep rows in mdir (budgets 3.5, 3.75; seeds 0, 1)."""
    st = {"bits": 3.5, "beta": 0.5, "seeds": [0], "sweep": [3.5, 3.75], "sweep_seeds": [0, 1],
          "other_seeds": None, "limit": n_items, "seed": 0, "ppl_windows": 1, "n_calib": 2,
          "seqlen": 64, "widths": [3, 4, 8], "granularity": "sublayer", "sens_widths": [3, 4],
          "sens_dtype": "bfloat16"}
    lines: list = []
    mod.write_paper_section(lines, "m", mdir, {"settings": st, "command": "c", "date": "d",
                                               "commit": "x", "machine": "m"},
                            tmp_path / "out", tmp_path / "t.md")
    return lines


def test_sweep_steps_at_other_seeds_in_the_table(tmp_path):
    """The sweep table is seed 0's; the rows of --sweep-seeds pair each step again at their
    seed, with the seed-0 step between the same budgets beside it (numbers from the logs)."""
    mod = _load_harness_plain()
    mdir = tmp_path / "out" / "m"
    (mdir / "rows").mkdir(parents=True)
    rng = np.random.default_rng(3)
    base = rng.uniform(0.5, 1.0, 7)
    step0, step1 = rng.normal(0.02, 0.01, 7), rng.normal(-0.01, 0.01, 7)
    _fake_sweep_row(mdir, "TASA sweep 3.500 storage bits", 3.5, 0, base)
    _fake_sweep_row(mdir, "TASA sweep 3.750 storage bits", 3.75, 0, base + step0)
    _fake_sweep_row(mdir, "TASA sweep 3.500 storage bits, seed 1", 3.5, 1, base + 0.1)
    _fake_sweep_row(mdir, "TASA sweep 3.750 storage bits, seed 1", 3.75, 1, base + 0.1 + step1)
    lines = _sweep_section(mod, mdir, tmp_path, 7)
    text = "\n".join(lines)
    sweep_table = text.split("Budget sweep")[1].split("Sweep steps again")[0]
    assert "seed 1" not in sweep_table and sweep_table.count("\n| 3.") == 2
    line = next(x for x in lines if x.startswith("- seed 1: 3.500 -> 3.750"))
    m1, h1 = mod.ci95(step1)
    m0, h0 = mod.ci95(step0)
    assert f"{m1:+.4f} ±{h1:.4f}" in line and f"seed 0: {m0:+.4f} ±{h0:.4f}" in line
    # seed noise: each budget at seeds 0 and 1 is one config at two seeds
    rms = math.sqrt((0.1 ** 2 + (0.1 + m1 - m0) ** 2) / 2)
    assert f"differs by {rms:.4f} b/B" in text and "over 2 seed pairs of 2 TASA configs" in text
    step_row = next(x for x in sweep_table.splitlines() if x.startswith("| 3.750"))
    assert ("**worse** (items)" in step_row) == (m0 > h0)      # far below 2 x 0.1
    assert "beyond seed noise" not in step_row


def test_sweep_step_beyond_seed_noise_is_flagged(tmp_path):
    """A step larger than twice the seed-to-seed difference of one config is flagged as worse
    beyond seed noise (here the two seeds of each budget differ by 0.001-0.002 b/B)."""
    mod = _load_harness_plain()
    mdir = tmp_path / "out" / "m"
    (mdir / "rows").mkdir(parents=True)
    base = np.random.default_rng(4).uniform(0.5, 1.0, 9)
    step = 0.03 + 0.002 * np.arange(9)
    for seed, off in ((0, 0.0), (1, 0.001)):
        sfx = f", seed {seed}" if seed else ""
        _fake_sweep_row(mdir, "TASA sweep 3.500 storage bits" + sfx, 3.5, seed, base + off)
        _fake_sweep_row(mdir, "TASA sweep 3.750 storage bits" + sfx, 3.75, seed, base + 2 * off + step)
    row = next(x for x in _sweep_section(mod, mdir, tmp_path, 9) if x.startswith("| 3.750"))
    assert "**worse beyond seed noise**" in row


@pytest.mark.slow
def test_paper_suite_on_a_tiny_model(harness, tmp_path, data_dir):
    """--suite paper: the rows it names, a sweep budget with the plan of a computed row reuses
    that row, and the table's paper section (seed-aggregated rows, paired lines, sweep)."""
    out = tmp_path / "p"
    args = ["--models", "tiny", "--limit", "3", "--ppl-windows", "1", "--n-calib", "2",
            "--seqlen", "64", "--bits", "3.8", "--suite", "paper", "--seeds", "0", "--sweep",
            "3.8", "--data", str(data_dir), "--out", str(out), "--rows",
            "GPTQ W4, seed 0;TASA 3.8 storage bits, seed 0;TASA sweep 3.800 storage bits"]
    assert harness.main(args) == 0
    rows = {json.loads(p.read_text())["name"]: json.loads(p.read_text())
            for p in (out / "tiny" / "rows").glob("*.json") if not p.name.endswith(".raw.json")}
    assert set(rows) == {"GPTQ W4, seed 0", "TASA 3.8 storage bits, seed 0",
                         "TASA sweep 3.800 storage bits"}
    t, sw = rows["TASA 3.8 storage bits, seed 0"], rows["TASA sweep 3.800 storage bits"]
    assert sw["same_as"] == t["name"] and sw["plan"] == t["plan"] and sw["eval"] == t["eval"]
    assert t["code_avg_bits"] < t["avg_bits"] <= 3.8
    table = (tmp_path / "reproduction.md").read_text()
    assert "Mean over calibration seeds" in table and "| TASA 3.8 storage bits | " in table
    assert "TASA 3.8 storage bits vs GPTQ W4:" in table and "Budget sweep" in table


def test_resume_may_add_rows_but_not_change_them(tmp_path):
    """meta.json: a rerun with more seeds / sweep budgets / other-seed rows adds rows (the record
    keeps the union); a setting that changes a row's numbers (--limit) is still refused."""
    mod = _load_harness_plain()
    meta = {"date": "d", "commit": "c", "machine": "m", "command": "x"}
    base = {"bits": 3.5, "limit": 50, "suite": "paper", "seeds": [0, 1, 2], "other_seeds": 1,
            "sweep": [3.25, 3.5]}
    mod.check_settings(tmp_path, "m", dict(base), meta)
    got = mod.check_settings(tmp_path, "m", {**base, "other_seeds": 3, "sweep": [3.375, 3.5]},
                             {**meta, "command": "y"})
    assert got["command"] == "y"           # the command that computes every row now
    assert got["settings"]["sweep"] == [3.25, 3.375, 3.5] and got["settings"]["other_seeds"] == 3
    rec = json.loads((tmp_path / "meta.json").read_text())["settings"]
    assert rec["sweep"] == [3.25, 3.375, 3.5] and rec["other_seeds"] == 3
    got = mod.check_settings(tmp_path, "m", {**base, "other_seeds": None}, meta)
    assert got["settings"]["other_seeds"] is None
    with pytest.raises(SystemExit, match="limit"):
        mod.check_settings(tmp_path, "m", {**base, "limit": 10}, meta)
