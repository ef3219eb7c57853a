"""What a new user meets on the command line (issue 28 item 4): budget errors that say the way
out, no perplexity check nobody asked for, quiet means quiet, run.json's bits, no empty folder
after a failed run, "did you mean" for a mistyped model."""
import json
import shutil


from tasa import cli
from tasa.quant import plan_to_dict, uniform_plan

from helpers import REPO, byte_tokenizer, tiny_llama

MEASUREMENT = REPO / "benchmarks" / "results" / "reproduction" / "smollm2-135m" / "measurement.json"


def test_allocate_infeasible_budget_names_the_fixes(tmp_path, capsys):
    shutil.copy(MEASUREMENT, tmp_path / "measurement.json")
    assert cli.main(["allocate", "--measurement", str(tmp_path), "--bits", "3.0",
                     "--out", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err
    assert "--code-bits 3.0" in err and "--widths 2,3,4,8" in err and "at least 3.3" in err
    assert not (tmp_path / "p.json").exists()
    # the first suggestion works as printed
    assert cli.main(["allocate", "--measurement", str(tmp_path), "--code-bits", "3.0",
                     "--out", str(tmp_path / "p.json")]) == 0
    assert json.loads((tmp_path / "p.json").read_text())["layers"]


def test_a_failed_run_leaves_no_empty_folder(tmp_path, capsys):
    out = tmp_path / "o"
    assert cli.main(["quantize", "--model", "smollm2-13m", "--bits", "3.5", "--out",
                     str(out)]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'smollm2-135m'" in err
    assert not out.exists()
    src = tmp_path / "src"
    tiny_llama().save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    assert cli.main(["quantize", "--model", str(src), "--bits", "1.0", "--out", str(out)]) == 2
    assert "below the minimum" in capsys.readouterr().err and not out.exists()
    # a folder that existed before the run is the user's: kept, even empty
    out.mkdir()
    assert cli.main(["quantize", "--model", str(src), "--bits", "1.0", "--out", str(out)]) == 2
    assert out.is_dir()
    # a mistyped folder gets the folder it probably meant
    assert cli.main(["quantize", "--model", str(tmp_path / "scr"), "--bits", "3.5", "--out",
                     str(tmp_path / "o2")]) == 2
    assert f"did you mean '{src}'" in capsys.readouterr().err


def test_plan_runs_no_perplexity_check_and_no_progress_is_quiet(tmp_path, capfd):
    src = tmp_path / "src"
    m = tiny_llama()
    m.save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    (tmp_path / "plan.json").write_text(json.dumps(plan_to_dict(uniform_plan(m, 4, 32, "sym"))))
    capfd.readouterr()
    args = ["quantize", "--model", str(src), "--plan", str(tmp_path / "plan.json"),
            "--method", "rtn", "--no-progress"]
    assert cli.main(args + ["--out", str(tmp_path / "a")]) == 0
    cap = capfd.readouterr()
    for bar in ("Loading weights", "Writing model shards", "it/s]"):
        assert bar not in cap.err, cap.err[-2000:]
    run = json.loads((tmp_path / "a" / "run.json").read_text())
    assert run["ppl_reference"] is None and run["ppl_quantized"] is None
    assert not any(k.startswith("eval_") for k in run["timings_s"])
    # the budget was not used: not recorded as if it had been; the achieved bits are
    assert run["config"]["bits"] is None and run["target_bits"] is None
    assert 4 + 16 / 32 <= run["avg_bits"] < 4.6      # 4-bit codes + a 16-bit scale per 32
    meta = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert meta["meta"]["tasa_pipeline"]["bits"] is None
    # asked for, the check runs
    assert cli.main(args + ["--out", str(tmp_path / "b"), "--eval-windows", "1"]) == 0
    run = json.loads((tmp_path / "b" / "run.json").read_text())
    assert run["ppl_reference"] is not None and run["ppl_quantized"] is not None
