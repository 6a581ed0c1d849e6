"""Typed models of the wattsched API (`wattsched.io/v1alpha1`): LLMWorkload, EnergyBudget and
NodePowerProfile, read and validated with the CRD schema's rules and defaults.

Shared by the operator, the agent and `wattsched plan`, so all three read the API the same way. The
CRD YAML in `crds/` is the source of truth; tests check these models against it. Not for Kubernetes
client calls, kopf or the optimizer (this package imports none of them).
"""

from wattsched_operator.api.energybudget import EnergyBudget, LabelSelector, parse_energybudget
from wattsched_operator.api.errors import ApiValidationError
from wattsched_operator.api.llmworkload import LLMWorkload, parse_llmworkload
from wattsched_operator.api.meta import API_VERSION, GROUP, VERSION, Condition, ObjectMeta
from wattsched_operator.api.nodepowerprofile import NodePowerProfile, parse_nodepowerprofile

__all__ = [
    "API_VERSION",
    "GROUP",
    "VERSION",
    "ApiValidationError",
    "Condition",
    "EnergyBudget",
    "LLMWorkload",
    "LabelSelector",
    "NodePowerProfile",
    "ObjectMeta",
    "parse_energybudget",
    "parse_llmworkload",
    "parse_nodepowerprofile",
]
