"""The implementation behind jax_megamoe's public modules (private: import the public names).

Layers, imports only downward: ``numerics`` -> ``kernels`` -> ``io`` -> ``models``.
"""
