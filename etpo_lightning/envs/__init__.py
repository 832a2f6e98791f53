"""Text environments for ETPO: the protocol, a vectorised runner, a toy task and the
data-science coding task with its sandbox and datasets.

See ``docs/environments.md`` for the protocol, how to add an environment, and what the
sandbox does and does not isolate.
"""

from .base import INFO_KEYS, TextEnv, make_info
from .datascience import DEF_LINE, DataScienceCodingEnv, protocol_auc, protocol_splits
from .datasets import CSVDataset, SklearnDataset, SyntheticDataset, TabularDataset
from .prompts import render_reflection_prompt, render_task_prompt
from .sandbox import Sandbox, SandboxResult
from .toy import KeywordEnv
from .vector import VectorEnv

__all__ = [
    "CSVDataset",
    "DEF_LINE",
    "DataScienceCodingEnv",
    "INFO_KEYS",
    "KeywordEnv",
    "Sandbox",
    "SandboxResult",
    "SklearnDataset",
    "SyntheticDataset",
    "TabularDataset",
    "TextEnv",
    "VectorEnv",
    "make_info",
    "protocol_auc",
    "protocol_splits",
    "render_reflection_prompt",
    "render_task_prompt",
]
