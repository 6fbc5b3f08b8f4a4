"""Importing ringattn from inside its source tree.

`python -m ringattn` or `python -m pytest` run in the repository root put the
root on sys.path, so `import ringattn` finds the source directory, which has
no compiled extension (ringattn._ext), before the installed package.  Rather
than fail, the source package hands over to the installed one (the one
`pip install .` built) by putting it in sys.modules under the same name.
"""

import importlib.metadata
import importlib.util
import os
import sys


def load_installed(name, source_init):
    here = os.path.dirname(os.path.abspath(source_init))
    try:
        init = os.path.abspath(str(importlib.metadata.distribution(name).locate_file(f"{name}/__init__.py")))
    except importlib.metadata.PackageNotFoundError:
        init = None
    if init is None or os.path.dirname(init) == here or not os.path.exists(init):
        raise ImportError(f"{name}'s compiled core is missing: build and install the package first "
                          "(pip install .), or import it from outside the source tree")
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[os.path.dirname(init)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # the import statement returns what sys.modules holds
    spec.loader.exec_module(module)
    return module
