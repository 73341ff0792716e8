"""Optional trainer integrations of :class:`torch_modularity.ClusterabilityMonitor`.

Each submodule needs its library and is never imported by ``import torch_modularity``:

* :mod:`torch_modularity.integrations.lightning`: ``pip install torch_modularity[lightning]``
* :mod:`torch_modularity.integrations.huggingface`: ``pip install torch_modularity[huggingface]``

Importing a submodule without its library raises ``ImportError`` naming the extra to install.
"""
from __future__ import annotations

__all__: list = []  # submodules are imported explicitly, never by *


def _missing(extra: str, package: str, err: ImportError) -> ImportError:
    return ImportError(
        f"torch_modularity.integrations.{extra} needs the '{package}' package, which could not be imported "
        f"({err}). Install it with: pip install 'torch_modularity[{extra}]'"
    )
