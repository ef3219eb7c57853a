"""Builds tasa_ext._C with torch's cpp_extension.

CppExtension on a CPU-only torch, CUDAExtension where torch has CUDA (and nvcc is found);
TASA_CUDA=0/1 overrides. Sources are globbed (csrc/cpu, csrc/cuda, tasa_ext/csrc), never listed.
The CUDA architectures are the explicit list in csrc/cuda/archs.txt (shared with CMake and the
compile-check test), not auto-detection. Build without isolation so the pinned torch is used:
    pip install -c constraints.txt --no-build-isolation -e .
"""
import glob
import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

ROOT = os.path.dirname(os.path.abspath(__file__))


def _glob(*patterns):
    return sorted(p for pat in patterns for p in glob.glob(pat, root_dir=ROOT))


def cuda_archs():
    with open(os.path.join(ROOT, "csrc", "cuda", "archs.txt")) as f:
        return [a for a in f.read().strip().split(";") if a]


def ext_modules():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    env = os.environ.get("TASA_CUDA")
    with_cuda = (torch.version.cuda is not None and CUDA_HOME is not None) if env is None else env == "1"
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-Wall", "-Wno-unused-function"]
    common = dict(
        name="tasa_ext._C",
        include_dirs=[os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "tasa_ext", "csrc")],
        extra_link_args=["-fopenmp"],
    )
    cpu = _glob("csrc/cpu/*.cpp", "tasa_ext/csrc/*.cpp")
    if not with_cuda:
        return [CppExtension(sources=cpu, extra_compile_args={"cxx": cxx}, **common)]
    gencode = []
    for a in cuda_archs():
        gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", "-DTASA_WITH_CUDA"] + gencode
    return [CUDAExtension(sources=cpu + _glob("csrc/cuda/*.cu", "tasa_ext/csrc/*.cu"),
                          extra_compile_args={"cxx": cxx + ["-DTASA_WITH_CUDA"], "nvcc": nvcc},
                          **common)]


# tasa_autoload.pth goes to the root of site-packages, where Python runs it at start-up (see
# python/tasa_autoload.py: it lets plain from_pretrained load tasa folders without `import tasa`).
# Wheels have no field for that, so the file is copied into the wheel's root by hand: build_py for
# `pip install .`, and editable_wheel (which never runs build_py's copy) for `pip install -e .`.
AUTOLOAD_PTH = os.path.join(ROOT, "python", "tasa_autoload.pth")


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        if not self.editable_mode:
            self.copy_file(AUTOLOAD_PTH, os.path.join(self.build_lib, "tasa_autoload.pth"))

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + (
            [] if self.editable_mode else [os.path.join(self.build_lib, "tasa_autoload.pth")])


class EditableWheelWithPth(editable_wheel):
    # _install_namespaces(unpacked_wheel_dir, ...) is the one step of setuptools' editable wheel
    # (>= 64, checked on 84) that writes files into the wheel's root; the .pth joins them there.
    def _install_namespaces(self, installation_dir, pth_prefix):
        super()._install_namespaces(installation_dir, pth_prefix)
        shutil.copy(AUTOLOAD_PTH, os.path.join(installation_dir, "tasa_autoload.pth"))


def cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True), "build_py": BuildPyWithPth,
            "editable_wheel": EditableWheelWithPth}


setup(
    name="tasa",
    version="0.1.0",
    description="Task-aware mixed-precision weight quantization of LLMs with fused 2/3/4/8-bit kernels",
    package_dir={"": "python", "tasa": "python/tasa", "tasa_ext": "tasa_ext"},
    py_modules=["tasa_autoload"],
    packages=["tasa_ext"] + ["tasa." + p for p in find_packages("python/tasa")] + ["tasa"],
    package_data={"tasa": ["data/*", "data/**/*"]},
    python_requires=">=3.10",
    install_requires=["torch", "numpy", "transformers>=5.24,<6", "gguf", "safetensors", "accelerate", "tqdm", "matplotlib",
                      "fastapi", "uvicorn"],
    ext_modules=ext_modules(),
    cmdclass=cmdclass(),
    entry_points={"console_scripts": ["tasa=tasa.cli:main"]},
    zip_safe=False,
)
