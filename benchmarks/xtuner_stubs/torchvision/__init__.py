"""A stand-in for torchvision, put on PYTHONPATH for the XTuner side of the benchmark only.

The torchvision wheel the registry has for torch 2.13.0 links against torch's CUDA libraries
(libc10_cuda.so, libtorch_cuda.so); beside the CPU build of torch its C extension does not load and
``import torchvision`` fails with "operator torchvision::nms does not exist". xtuner.dataset imports
torchvision at module level (for its InternVL image dataset) although the text pipeline measured here
never uses it, so this package provides the names imported and fails loudly if anything is called.
setup_xtuner_env.sh uninstalls the real torchvision, so transformers sees no torchvision installed.
"""

__version__ = "0.0.0+benchmark-stub"

from . import transforms  # noqa: E402,F401
