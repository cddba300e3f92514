"""patchlab: causal interventions on transformer language models, built on nnsight.

Public API (see README.md for a tour):

- models: `load_model`, `PatchModel`, `DEFAULT_MODEL`
- addresses: `Component`, `Site`
- data: `PromptPair`, `PromptPairDataset`, `ioi_dataset`
- metrics: `Metric`, `Direction`
- activation patching: `patch_layer_pos`, `patch_heads`, `patch_components`
- figures: `plot_layer_pos`, `plot_layer_head`, `plot_sweep`
- experiment folders: `ExperimentRun`
"""

from .components import Component, Site
from .data import DatasetError, PromptPair, PromptPairDataset
from .embedded import DEFAULT_MODEL
from .experiment import ExperimentRun
from .ioi import ioi_dataset
from .metrics import Direction, Metric
from .models import PatchModel, load_model
from .patching import patch_components, patch_heads, patch_layer_pos
from .plotting import plot_layer_head, plot_layer_pos, plot_sweep

__version__ = "0.1.0"

__all__ = [
    "Component", "Site",
    "DatasetError", "PromptPair", "PromptPairDataset", "ioi_dataset",
    "DEFAULT_MODEL", "PatchModel", "load_model",
    "Direction", "Metric",
    "patch_components", "patch_heads", "patch_layer_pos",
    "plot_layer_head", "plot_layer_pos", "plot_sweep",
    "ExperimentRun",
]
