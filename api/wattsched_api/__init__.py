"""Typed models of the wattsched API (`wattsched.io/v1alpha1`): LLMWorkload, EnergyBudget and
NodePowerProfile, read and validated with the CRD schema's rules and defaults.

Shared by the operator, the agent, the simulator and the CLI, so all read the API the same way;
`vocabulary` holds its words (phases, condition types and reasons, Event reasons, labels,
annotations, env names, measured/modelled), `meta` its times (one RFC 3339 parser), and
`commandline` the CLI conventions every command shares (exit codes, one-line errors, text
tables). The CRD YAML in `crds/` is the source of truth; tests check these models against it. Not
for Kubernetes client calls, kopf or the optimizer: this package imports no other wattsched
package and none of them (an import-linter contract).
"""

from wattsched_api.energybudget import EnergyBudget, LabelSelector, parse_energybudget
from wattsched_api.errors import ApiValidationError
from wattsched_api.llmworkload import LLMWorkload, parse_llmworkload
from wattsched_api.meta import API_VERSION, GROUP, VERSION, Condition, ObjectMeta
from wattsched_api.nodepowerprofile import NodePowerProfile, parse_nodepowerprofile

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
