"""``python -m tasa ...`` = the ``tasa`` command, which is what ``torchrun --nproc-per-node N -m
tasa quantize ...`` runs on every rank (:mod:`tasa.distributed`). It runs :mod:`tasa.cli` as the
program (runpy) rather than importing it: nothing in the package imports the cli."""
import runpy

runpy.run_module("tasa.cli", run_name="__main__", alter_sys=True)
