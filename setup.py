"""Builds tasa_ext._C with torch's cpp_extension.

CppExtension on a CPU-only torch, CUDAExtension where torch has CUDA (and nvcc is found);
TASA_CUDA=0/1 overrides. Sources are globbed (csrc/cpu, csrc/cuda, tasa_ext/csrc), never listed.
The CUDA architectures are the explicit list in csrc/cuda/archs.txt (shared with CMake and the
compile-check test), not auto-detection. Build without isolation so the pinned torch is used:
    pip install -c constraints.txt --no-build-isolation -e .
"""
import glob
import os

from setuptools import find_packages, setup

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


def cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(
    name="tasa",
    version="0.1.0",
    description="Task-aware mixed-precision weight quantization of LLMs with fused 2/3/4/8-bit kernels",
    package_dir={"tasa": "python/tasa", "tasa_ext": "tasa_ext"},
    packages=["tasa_ext"] + ["tasa." + p for p in find_packages("python/tasa")] + ["tasa"],
    package_data={"tasa": ["data/*", "data/**/*"]},
    python_requires=">=3.10",
    install_requires=["torch", "numpy", "transformers>=5.24,<6", "gguf", "safetensors", "accelerate", "tqdm", "matplotlib"],
    ext_modules=ext_modules(),
    cmdclass=cmdclass(),
    entry_points={"console_scripts": ["tasa=tasa.cli:main"]},
    zip_safe=False,
)
