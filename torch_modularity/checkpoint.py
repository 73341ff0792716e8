"""Safe loading of ``torch.save`` checkpoints (``weights_only=True`` unless trusted)."""
from __future__ import annotations

from typing import Dict, Union

import torch
from torch import nn

__all__ = ["CheckpointError", "load_model_or_state_dict"]


class CheckpointError(ValueError):
    """A checkpoint could not be read as a model or a state_dict."""


def load_model_or_state_dict(path: str, trust: bool = False) -> Union[nn.Module, Dict[str, torch.Tensor]]:
    """The module or state_dict stored in a ``torch.save`` file.

    Read with ``weights_only=True`` first. A file holding pickled objects (a whole module) is
    only unpickled when ``trust`` is set, because unpickling runs code from the file. A
    state_dict nested under ``state_dict`` / ``model_state_dict`` / ``model`` is unwrapped.

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "mlp.pt")
        >>> torch.save(nn.Linear(3, 2).state_dict(), path)
        >>> sorted(load_model_or_state_dict(path))
        ['bias', 'weight']

    Args:
        path: the checkpoint file.
        trust: allow unpickling arbitrary objects.

    Returns:
        An ``nn.Module`` or a dict of tensors.

    Raises:
        CheckpointError: missing, damaged, untrusted-pickle or unsupported content; the
            message says which and what to do.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except Exception as err:
        # Only a refused *global* (a class such as nn.Sequential) means "pickled objects";
        # anything else is a damaged or foreign file, which trusting would not fix.
        if "Unsupported global" not in str(err):
            raise CheckpointError(f"could not read checkpoint {path}: not a valid torch.save file or damaged "
                                  f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
        if not trust:
            raise CheckpointError(
                f"{path} is not a plain state_dict: it holds pickled objects (such as a whole nn.Module), which "
                f"torch.load refuses with weights_only=True. Loading it runs code from the file: if you trust it, "
                f"pass --trust-checkpoint (trust=True); or save model.state_dict() instead."
            ) from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err2:
            raise CheckpointError(f"could not read checkpoint {path}: {err2}") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), (dict, nn.Module)):
                obj = obj[key]
                break
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict):
        return dict(obj)
    raise CheckpointError(f"{path} holds a {type(obj).__name__}, not an nn.Module or a state_dict")
