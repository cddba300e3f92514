"""patchlab: causal interventions on transformer language models, built on nnsight.

Public API (see README.md for a tour):

- models: `load_model`, `PatchModel`, `DEFAULT_MODEL`; errors `ModelNotFoundError`, `UnsupportedModelError`
- addresses: `Component`, `Site`
- data: `PromptPair`, `PromptPairDataset`, `ioi_dataset`, `chat_pairs` (chat-formatted instructions)
- metrics: `Metric`, `Direction`; `BaselineGapError` (no clean-corrupted gap to normalise by)
- activation patching: `patch_layer_pos`, `patch_heads`, `patch_components`
- your own interventions: `Patch`, `Ablate`, `Steer`, `ProjectOut`, `Scale`, `Freeze`, `At`, `PatchEdge`, `run_interventions`,
  `sweep_interventions`, `trace`; user metrics `MetricFunction`
- generation with interventions at every step: `generate`
- directions: `mean_difference` (difference in means, e.g. the refusal direction)
- refusal: `chat_prompt`, `is_refusal`, `refusal_rate`, `refusal_openers`; the test-bed
  ``load_model("smollm2-135m-refusal")`` (`patchlab.refusal_model`)
- figures: `plot_layer_pos`, `plot_layer_head`, `plot_sweep`
- edge and path patching: `patch_edges`, `patch_senders_into`, `path_patch_heads`, `Edge`, `Node`, `Graph`
- circuit discovery: `eap`, `eap_ig`, `exact_edge_scores`, `acdc`, `iterative_path_patching`
- circuits: `Circuit`, `evaluate_circuits`, `faithfulness_curve`, `agreement`, `roc_auc`,
  `plot_circuit`, `plot_faithfulness_curves`
- a model with a known circuit: `load_induction_model`, `induction_dataset`, `known_circuit`
- causal tracing: `Fact`, `FactDataset`, `builtin_facts`, `check_facts`, `causal_trace`,
  `plot_causal_trace`, `plot_causal_trace_summary`
- experiment folders: `ExperimentRun`, `ResumeMismatchError`
- remote execution on hosted models (NDIF): `Remote`, `RemoteExecutionError` and its
  subclasses `RemoteConnectionError`, `RemoteAuthError`, `RemoteJobError`, `RemoteTimeoutError`
"""

from .acdc_search import acdc
from .adapters import UnsupportedModelError
from .agreement import agreement, roc_auc
from .attribution import eap, eap_ig
from .chat import chat_pairs, chat_prompt
from .circuit import Circuit
from .circuit_plots import plot_circuit, plot_faithfulness_curves
from .components import Component, Site
from .directions import mean_difference
from .data import DatasetError, PromptPair, PromptPairDataset
from .embedded import DEFAULT_MODEL
from .edges import patch_edges, patch_senders_into
from .exact import exact_edge_scores
from .experiment import ExperimentRun, ResumeMismatchError
from .facts import Fact, FactDataset, builtin_facts, check_facts
from .faithfulness import evaluate_circuits, faithfulness_curve
from .generation import generate
from .graph import Channel, Edge, Graph, Node, NodeKind
from .induction import InductionConfig, induction_dataset, known_circuit, load_induction_model
from .iterative_paths import iterative_path_patching
from .ioi import ioi_dataset
from .metrics import BaselineGapError, Direction, Metric, MetricFunction
from .interventions import Ablate, At, Freeze, Intervention, Patch, PatchEdge, ProjectOut, Scale, Steer
from .intervene import run_interventions, sweep_interventions, trace
from .models import ModelNotFoundError, PatchModel, load_model
from .patching import patch_components, patch_heads, patch_layer_pos
from .paths import path_patch_heads
from .remote import (Remote, RemoteAuthError, RemoteConnectionError, RemoteExecutionError, RemoteJobError,
                     RemoteTimeoutError)
from .plotting import plot_layer_head, plot_layer_pos, plot_sweep
from .refusal import is_refusal, refusal_openers, refusal_rate
from .tracing import causal_trace
from .tracing_plots import plot_causal_trace, plot_causal_trace_summary

__version__ = "0.1.0"

__all__ = [
    "Component", "Site",
    "DatasetError", "PromptPair", "PromptPairDataset", "ioi_dataset", "chat_pairs", "chat_prompt",
    "DEFAULT_MODEL", "PatchModel", "load_model", "ModelNotFoundError", "UnsupportedModelError",
    "BaselineGapError", "Direction", "Metric", "MetricFunction",
    "patch_components", "patch_heads", "patch_layer_pos",
    "Intervention", "Patch", "Ablate", "Steer", "ProjectOut", "Scale", "Freeze", "At", "PatchEdge",
    "run_interventions", "sweep_interventions", "trace", "generate",
    "mean_difference", "is_refusal", "refusal_rate", "refusal_openers",
    "plot_layer_head", "plot_layer_pos", "plot_sweep",
    "Channel", "Edge", "Graph", "Node", "NodeKind",
    "patch_edges", "patch_senders_into", "path_patch_heads",
    "eap", "eap_ig", "exact_edge_scores", "acdc", "iterative_path_patching",
    "Circuit", "evaluate_circuits", "faithfulness_curve", "agreement", "roc_auc",
    "plot_circuit", "plot_faithfulness_curves",
    "InductionConfig", "induction_dataset", "known_circuit", "load_induction_model",
    "Fact", "FactDataset", "builtin_facts", "check_facts", "causal_trace",
    "plot_causal_trace", "plot_causal_trace_summary",
    "ExperimentRun", "ResumeMismatchError",
    "Remote", "RemoteExecutionError", "RemoteConnectionError", "RemoteAuthError", "RemoteJobError",
    "RemoteTimeoutError",
]
