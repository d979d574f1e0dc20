"""Layer 1, the architectures: one file per sparsity rule and the torch-free catalogue that lists them.

``catalogue.py`` is what the rest of the package reads (choices, defaults, costs, foreign names);
``base.py`` the interface a rule implements; ``kernels.py`` the custom autograd functions of the
sparse step. Importing this package imports no torch.
"""
