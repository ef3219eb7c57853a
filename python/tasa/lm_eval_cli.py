"""``python -m tasa.lm_eval_cli ARGS``: lm-eval's own command line with tasa's transformers
integration registered first, so ``--model hf --model_args pretrained=FOLDER`` loads a tasa
folder (lm-eval builds the model with ``AutoModelForCausalLM.from_pretrained``, which needs the
``"tasa"`` quantization method registered by ``import tasa``). In Python, ``import tasa`` and
then ``lm_eval.models.huggingface.HFLM(pretrained=FOLDER)`` is all it takes.

    python -m tasa.lm_eval_cli --model hf --model_args pretrained=tasa-out --tasks arc_easy

(lm-eval downloads its task data unless the tasks are local: ``--include_path`` with YAML tasks
over local files, or ``tasa eval``, which builds offline tasks from shipped or local data.)
"""
from __future__ import annotations

import sys

from . import hf
from .evaluation import require_lm_eval

__all__ = ["main"]


def main(argv=None) -> None:
    """Runs lm-eval's CLI (``lm_eval.__main__.cli_evaluate``) on ``argv`` (default: the command
    line) with tasa registered."""
    hf.register()
    require_lm_eval()
    from lm_eval.__main__ import cli_evaluate  # lm-eval is optional: imported once it is needed

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
