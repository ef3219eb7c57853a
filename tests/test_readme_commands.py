"""Every `tasa` command in the README's code blocks parses with the real parser, and the cheap
ones run as written (issue 28 item 4): `tasa allocate`, `tasa generate` (one turn, raw,
interactive), `tasa lm-eval-tasks`, and lm-eval's own CLI line on tasa's shipped tasks, in a
folder where `tasa-out` is a tiny tasa model beside the committed SmolLM2 measurement. The
expensive ones (the README job, `tasa quantize`, `tasa eval` on shared/data, `tasa serve`, which
runs until stopped) are covered by their own tests; here they must at least parse."""
import io
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import torch

import tasa
from tasa import cli
from tasa import evaluation as tev

from helpers import REPO, tiny_llama
from test_chat import chat_tokenizer

MEASUREMENT = REPO / "benchmarks" / "results" / "reproduction" / "smollm2-135m" / "measurement.json"
TASKS_SUB = '"$(tasa lm-eval-tasks)"'


def readme_commands():
    """(tool, argv) of every command line in the README's fenced code blocks (``&&`` chains
    split; ``tasa`` after ``torchrun ... -m``)."""
    lines, fence = [], None
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith("```"):
            fence = line[3:].strip() if fence is None else None
            continue
        if fence in ("", "bash", "sh") and line.startswith(("tasa ", "lm_eval ", "torchrun ",
                                                             "python3 ")):
            lines.append(line)      # commands start a line; the layout block's lines do not
    out = []
    if True:
        for line in lines:
            for part in line.split("&&"):
                part = part.replace(TASKS_SUB, str(tev.LM_EVAL_TASK_DIR))
                try:
                    argv = shlex.split(part, comments=True)
                except ValueError:
                    continue
                if "-m" in argv and argv[0] == "torchrun":
                    argv = ["tasa"] + argv[argv.index("-m") + 2:]
                if argv and argv[0] in ("tasa", "lm_eval"):
                    out.append((argv[0], argv[1:]))
    return out


COMMANDS = readme_commands()


def test_the_readme_has_the_commands_this_test_runs():
    subs = {(t, a[0]) for t, a in COMMANDS}
    for want in [("tasa", "quantize"), ("tasa", "allocate"), ("tasa", "generate"),
                 ("tasa", "serve"), ("tasa", "eval"), ("lm_eval", "run")]:
        assert want in subs, want


@pytest.mark.parametrize("argv", [a for t, a in COMMANDS if t == "tasa"],
                         ids=lambda a: " ".join(a)[:60])
def test_every_tasa_command_parses(argv):
    args = cli.build_parser().parse_args(argv)      # SystemExit (a test failure) if not
    assert callable(args.fn)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("readme")
    torch.manual_seed(0)
    m = tasa.quantize(tiny_llama(), None, bits=4, method="rtn", group_size=32, progress=False)
    m.save_pretrained(d / "tasa-out")
    chat_tokenizer().save_pretrained(d / "tasa-out")
    shutil.copy(MEASUREMENT, d / "tasa-out" / "measurement.json")
    return d


CHEAP = [a for t, a in COMMANDS if t == "tasa" and a[0] in ("allocate", "generate",
                                                            "lm-eval-tasks")]


@pytest.mark.parametrize("argv", CHEAP, ids=lambda a: " ".join(a)[:60])
def test_cheap_tasa_commands_run_as_written(argv, workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n\n"))     # for -i
    assert cli.main(list(argv)) == 0, capsys.readouterr().err[-2000:]


def test_readme_lm_eval_command_runs_as_written(workdir):
    pytest.importorskip("lm_eval")
    lines = [a for t, a in COMMANDS if t == "lm_eval" and "pretrained=tasa-out" in " ".join(a)]
    assert lines
    r = subprocess.run([sys.executable, "-m", "lm_eval", *lines[0], "--limit", "3"],
                       cwd=workdir, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "tasa_arc_easy" in r.stdout
