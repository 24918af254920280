"""Build script. The compiled kernels build on first use (JIT, see
hf_creative_sparse/ops/_ext.py) unless they are built here, ahead of time:

* ``HCS_BUILD_EXT`` unset (auto): built when the build environment has torch with a
  visible GPU and a CUDA toolkit (``pip install --no-build-isolation .`` on a GPU machine);
  with pip's default build isolation torch is absent and nothing is built here.
* ``HCS_BUILD_EXT=1``: always build the CPU extension, and the CUDA one when a CUDA toolkit
  is found (``HCS_FORCE_CUDA=1`` builds it without a visible GPU).
* ``HCS_BUILD_EXT=0``: never; JIT on first use.
"""

import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _read_version() -> str:
    with open(os.path.join(ROOT, "hf_creative_sparse", "__init__.py")) as fh:
        for line in fh:
            if line.startswith("__version__"):
                return line.split("=")[1].strip().strip('"')
    raise RuntimeError("no __version__ in hf_creative_sparse/__init__.py")


def _ahead_of_time_extensions():
    """(ext_modules, cmdclass) per HCS_BUILD_EXT (see the module docstring)."""
    mode = os.environ.get("HCS_BUILD_EXT", "auto")
    if mode == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        if mode == "1":
            raise RuntimeError("HCS_BUILD_EXT=1 needs torch in the build environment: "
                               "pip install --no-build-isolation ...")
        return [], {}
    has_cuda = CUDA_HOME is not None and (torch.cuda.is_available() or os.environ.get("HCS_FORCE_CUDA") == "1")
    if mode != "1" and not has_cuda:
        return [], {}
    import sys

    sys.path.insert(0, os.path.join(ROOT, "hf_creative_sparse", "ops"))
    import _ext_sources  # noqa: E402  (plain module listing sources and flags)

    exts = []
    cpu = _ext_sources.cpu_spec(ROOT)
    if cpu is not None:
        exts.append(CppExtension(name="hf_creative_sparse._C_cpu", sources=cpu["sources"],
                                 extra_compile_args={"cxx": cpu["cflags"]}, extra_link_args=cpu["ldflags"]))
    cuda = _ext_sources.cuda_spec(ROOT)
    if cuda is not None and has_cuda:
        exts.append(CUDAExtension(name="hf_creative_sparse._C_cuda", sources=cuda["sources"],
                                  include_dirs=cuda["include_dirs"],
                                  extra_compile_args={"cxx": cuda["cflags"], "nvcc": cuda["cuda_cflags"]}))
    return exts, {"build_ext": BuildExtension}


ext_modules, cmdclass = _ahead_of_time_extensions()

setup(
    name="hf_creative_sparse",
    version=_read_version(),
    description="Controllable sparsity for Hugging Face models: compiled sparse attention and creative decoding",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["hf_creative_sparse", "hf_creative_sparse.*"])
    + ["hf_creative_sparse.patches", "hf_creative_sparse.csrc"],
    # patches/ and csrc/ sit at the top level (the design's layout) and install inside the
    # package, so the JIT build finds its sources in a non-editable install too.
    package_dir={"hf_creative_sparse.patches": "patches", "hf_creative_sparse.csrc": "csrc"},
    package_data={"hf_creative_sparse": ["data/*.json", "data/*.txt"],
                  "hf_creative_sparse.csrc": ["cpu/*", "cuda/*", "include/*"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.5",
        "numpy",
        "ninja",
        "safetensors",
        "tqdm",
        "scipy",  # the sweep's 1-D maximisation and root finding
        "nltk",  # BLEU (self-BLEU diagnostic)
    ],
    extras_require={
        "hf": ["transformers>=5.0,<6", "diffusers>=0.35", "accelerate", "gguf", "sentencepiece",
               "sentence-transformers"],
        "plot": ["matplotlib"],  # the sweep's figure; imported only where it draws
        "dev": ["transformers>=5.0,<6", "diffusers>=0.35", "accelerate", "gguf", "sentencepiece",
                "sentence-transformers", "matplotlib", "pytest", "hypothesis", "psutil", "entmax", "pyflakes"],
        "cuda": ["nvidia-cutlass"],
    },
    entry_points={"console_scripts": ["hf-creative-sparse=hf_creative_sparse.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
