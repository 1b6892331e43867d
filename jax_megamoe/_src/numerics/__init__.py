"""Layer 1, numerics: settings and modes (``config``), MXFP4/FP8 quantization (``quant``), kernel
weight layouts (``layout``, ``MoEWeights``) and the pure-JAX oracle (``reference``).

Imports nothing else from the package. Submodules are imported on use.
"""
