"""Sphinx configuration: the API reference, generated from the numpydoc docstrings (napoleon)."""

project = "viterbi-numba"
author = "the viterbi-numba developers"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
autodoc_typehints = "description"
autodoc_member_order = "bysource"
exclude_patterns = ["_build", "design.md"]
html_theme = "alabaster"
nitpicky = False
