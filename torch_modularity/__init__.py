"""torch_modularity: measure and shape the modularity (spectral clusterability) of PyTorch networks."""
from . import pruning
from .checkpoint import CheckpointError, load_model_or_state_dict
from .flow import dead_units, path_flow, remove_dead
from .graph import WeightGraph
from .measure import ClusterabilityResult, clusterability
from .monitor import ClusterabilityMonitor
from .regularizer import DisconnectedGraphWarning, SpectralRegularizer, normalize_relu_
from .shuffle import SHUFFLE_METHODS, shuffle_weights
from .spectral import ncut, spectral_clustering, spectral_embedding
from .trace import UnsupportedModuleError, transformer_mlp_graphs

__version__ = "0.1.0"

__all__ = [
    "WeightGraph",
    "ClusterabilityResult",
    "clusterability",
    "ClusterabilityMonitor",
    "SpectralRegularizer",
    "normalize_relu_",
    "DisconnectedGraphWarning",
    "path_flow",
    "dead_units",
    "remove_dead",
    "ncut",
    "spectral_clustering",
    "spectral_embedding",
    "shuffle_weights",
    "SHUFFLE_METHODS",
    "CheckpointError",
    "load_model_or_state_dict",
    "pruning",
    "transformer_mlp_graphs",
    "UnsupportedModuleError",
]
