"""A tasa folder loads with plain transformers in a fresh interpreter, without ``import tasa``
(tasa_autoload.pth), and lm-eval's own CLI runs tasa's shipped offline tasks on it."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import tasa
import tasa_autoload
from tasa import evaluation as tev
from tasa import hf

from helpers import REPO, byte_tokenizer, rtn_folder

OFFLINE = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
OFFLINE.pop("TASA_NO_AUTOLOAD", None)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return rtn_folder(tmp_path_factory.mktemp("tasa_folder"))


def _fresh(code: str, env=None, **kw):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env or OFFLINE, timeout=300, **kw)


def test_quant_method_is_one_fact():
    assert tasa_autoload.QUANT_METHOD == hf.QUANT_METHOD


def test_plain_from_pretrained_in_a_fresh_interpreter(folder, tmp_path):
    """No `import tasa` anywhere in the child: the folder still loads as TasaLinear layers, with
    the same logits as tasa.load, and tasa is imported only when the folder's config is read."""
    ids = [[3, 17, 101, 7, 250, 42]]
    ref = tasa.load(str(folder))(torch.tensor(ids)).logits
    out = tmp_path / "logits.pt"
    r = _fresh(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        before = 'tasa' in sys.modules
        m = AutoModelForCausalLM.from_pretrained({str(folder)!r})
        with torch.no_grad():
            torch.save(m(torch.tensor({ids})).logits, {str(out)!r})
        print(before, type(m.model.layers[0].mlp.up_proj).__name__)
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["False", "TasaLinear"], r.stdout
    assert "Unknown quantization type" not in r.stderr
    torch.testing.assert_close(torch.load(out), ref.detach(), rtol=0, atol=1e-5)


def test_the_pth_is_installed_in_site_packages():
    """The hook is live in this interpreter's environment (installed by pip, not by the test)."""
    r = _fresh("import sys; print(any(type(f).__name__ == '_Finder' and "
               "type(f).__module__ == 'tasa_autoload' for f in sys.meta_path))")
    assert r.stdout.strip() == "True", (r.stdout, r.stderr)


def test_opt_out_and_a_broken_tasa(folder):
    """TASA_NO_AUTOLOAD=1 removes the hook (transformers then skips the unknown method, as
    documented); a tasa that fails to import makes the load fail, naming tasa, instead of
    building random layers."""
    r = _fresh("import sys; print(any(type(f).__module__ == 'tasa_autoload' "
               "for f in sys.meta_path))", env=dict(OFFLINE, TASA_NO_AUTOLOAD="1"))
    assert r.stdout.strip() == "False", r.stderr
    r = _fresh(f"""
        import sys
        sys.modules['tasa'] = None          # `import tasa` raises ImportError
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained({str(folder)!r})
    """)
    assert r.returncode != 0
    assert "quantized with tasa" in r.stderr and "import tasa" in r.stderr, r.stderr[-2000:]


def test_install_is_idempotent_and_patches_a_loaded_transformers():
    import transformers.quantizers.auto as auto
    tasa_autoload.install()
    tasa_autoload.install()
    assert auto.AutoHfQuantizer._tasa_autoload is True
    n = sum(type(f).__module__ == "tasa_autoload" for f in sys.meta_path)
    assert n <= 1
    # the wrapped entry points still answer for other methods and for tasa
    assert auto.AutoHfQuantizer.supports_quant_method({"quant_method": "tasa"})
    assert not auto.AutoHfQuantizer.supports_quant_method({"quant_method": "no-such-method"})


def test_build_py_puts_the_pth_in_the_wheel_root(tmp_path):
    """`pip install .` (a regular wheel) gets the .pth from build_py; the editable install used
    here gets it from editable_wheel (checked live by the tests above)."""
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib",
                        str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    pth = tmp_path / "tasa_autoload.pth"
    assert pth.read_text().strip() == "import tasa_autoload; tasa_autoload.install()"
    assert (tmp_path / "tasa_autoload.py").exists()
    assert (tmp_path / "tasa" / "data" / "lm_eval_tasks" / "tasa_arc_easy.yaml").exists()


def test_lm_eval_own_cli_runs_the_shipped_tasks(folder, tmp_path):
    """`python -m lm_eval` (not tasa's wrapper) on the folder with tasa's offline tasks scores
    the same numbers as tasa.evaluation.evaluate on the same items: the model it ran is the tasa one."""
    pytest.importorskip("lm_eval")
    src = tev.resolve_data(None, ["gsm8k_test", "arc_easy_test"])
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text("".join(src["gsm8k_test"].read_text().splitlines(keepends=True)[:3]))
    data = {"gsm8k_test": str(gsm)}
    r = subprocess.run(
        [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
         f"pretrained={folder}", "--include_path", str(tev.LM_EVAL_TASK_DIR), "--tasks",
         "tasa_gsm8k_nll", "--metadata", json.dumps({"tasa_data": data}), "--batch_size", "1",
         "--device", "cpu", "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, env=OFFLINE, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(next((tmp_path / "out").rglob("results*.json")).read_text())
    got = res["results"]["tasa_gsm8k_nll"]
    assert res["n-samples"]["tasa_gsm8k_nll"]["effective"] == 3
    want = tev.evaluate(tasa.load(str(folder)), byte_tokenizer(), tasks=["gsm8k_nll"],
                        data=data, progress=False)["results"]["gsm8k_nll"]
    assert got["nll,none"] == pytest.approx(want["nll"], rel=1e-4)


def test_shipped_yaml_names_every_task():
    names = sorted(p.stem for p in tev.LM_EVAL_TASK_DIR.glob("*.yaml"))
    assert names == sorted(tev.LM_EVAL_PREFIX + t for t in tev.TASKS)
    with pytest.raises(ValueError, match="unknown|choose"):
        tev.lm_eval_task({"task": "tasa_no_such_task"})
