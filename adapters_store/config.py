"""adapter_config.json: parsed and checked before any tensor is touched.

Everything decidable from the config alone (type, task, sizes, declared token_dim) is checked
here, so a config that claims 10**9 virtual tokens or the wrong model is rejected at the cost of
a JSON parse.
"""

from __future__ import annotations

import json
import reprlib
from dataclasses import dataclass

from adapters_store.errors import (
    ConfigInvalidError,
    ConfigMissingError,
    TaskTypeMismatchError,
    TokenDimMismatchError,
    TooManyVirtualTokensError,
    UnsupportedAdapterTypeError,
)
from adapters_store.records import Limits, ModelSpec, PeftType, TaskType

CONFIG_NAME = "adapter_config.json"
_SUPPORTED_PEFT = ", ".join(t.value for t in PeftType)
_SUPPORTED_TASKS = ", ".join(t.value for t in TaskType)
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlong = 40
_SHORT.maxlevel = 2


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of adapter_config.json this package relies on, already checked."""

    peft_type: PeftType
    task_type: TaskType
    num_virtual_tokens: int
    num_transformer_submodules: int
    token_dim: int | None  # declared by the config; None when absent
    raw: dict  # the whole parsed JSON object

    @property
    def total_virtual_tokens(self) -> int:
        """Rows of the saved prompt_embeddings tensor."""
        return self.num_virtual_tokens * self.num_transformer_submodules


def shown(value: object) -> str:
    """A config value for an error message, cut short: a value can be megabytes long."""
    return _SHORT.repr(value)


def optional_int(raw: dict, key: str) -> int | None:
    """raw[key] as a positive integer, or None when absent; ConfigInvalidError otherwise."""
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigInvalidError(
            f"{CONFIG_NAME}: {key} must be a positive integer, got {shown(value)}"
        )
    return value


def _peft_type(raw: dict) -> PeftType:
    if "peft_type" not in raw or raw["peft_type"] is None:
        raise ConfigInvalidError(
            f"{CONFIG_NAME} has no peft_type: upload the config written by PEFT's "
            f"save_pretrained (supported peft_type: {_SUPPORTED_PEFT})"
        )
    value = raw["peft_type"]
    try:
        return PeftType(value)
    except ValueError:
        raise UnsupportedAdapterTypeError(
            f"unsupported adapter type peft_type={shown(value)}: this server serves soft prompts "
            f"only; supported peft_type: {_SUPPORTED_PEFT}"
        ) from None


def _task_type(raw: dict, spec: ModelSpec) -> TaskType:
    value = raw.get("task_type")
    if value is None:
        if spec.task_type is not None:
            return spec.task_type
        raise ConfigInvalidError(
            f"{CONFIG_NAME} has no task_type: set it to one of {_SUPPORTED_TASKS}"
        )
    try:
        task = TaskType(value)
    except ValueError:
        raise UnsupportedAdapterTypeError(
            f"unsupported task_type={shown(value)}: supported task types: {_SUPPORTED_TASKS}"
        ) from None
    if spec.task_type is not None and task != spec.task_type:
        raise TaskTypeMismatchError(
            f"adapter task_type is {task.value} but the served model is {spec.task_type.value}: "
            "the adapter was trained for another kind of model"
        )
    return task


def token_dim_mismatch(found: int, spec: ModelSpec, *, where: str) -> TokenDimMismatchError:
    """The one message for a hidden-size mismatch, wherever it is detected."""
    return TokenDimMismatchError(
        f"{where} has token_dim {shown(found)} but the served model's hidden size is "
        f"{spec.token_dim}: the adapter was trained for another model"
    )


def parse_config(data: bytes | None, *, spec: ModelSpec, limits: Limits) -> AdapterConfig:
    """Parse and check adapter_config.json bytes; raises one specific error per problem."""
    if data is None:
        raise ConfigMissingError(
            f"{CONFIG_NAME} is missing: upload the directory written by PEFT's save_pretrained "
            f"({CONFIG_NAME} plus adapter_model.safetensors or adapter_model.bin)"
        )
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ConfigInvalidError(f"{CONFIG_NAME} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigInvalidError(
            f"{CONFIG_NAME} must hold a JSON object, got {type(raw).__name__}"
        )
    peft_type = _peft_type(raw)
    task_type = _task_type(raw, spec)
    if raw.get("num_virtual_tokens") is None:
        raise ConfigInvalidError(f"{CONFIG_NAME} has no num_virtual_tokens")
    num_virtual_tokens = optional_int(raw, "num_virtual_tokens")
    assert num_virtual_tokens is not None
    if num_virtual_tokens > limits.max_virtual_tokens:
        raise TooManyVirtualTokensError(
            f"num_virtual_tokens is {shown(num_virtual_tokens)}, above this server's limit of "
            f"{limits.max_virtual_tokens}: train the adapter with fewer virtual tokens"
        )
    submodules = optional_int(raw, "num_transformer_submodules")
    if submodules is None:
        submodules = 2 if task_type == TaskType.SEQ_2_SEQ_LM else 1
    allowed = (1, 2) if task_type == TaskType.SEQ_2_SEQ_LM else (1,)
    if submodules not in allowed:
        raise ConfigInvalidError(
            f"{CONFIG_NAME}: num_transformer_submodules={shown(submodules)} is not valid for "
            f"task_type {task_type.value} (expected one of {allowed})"
        )
    token_dim = optional_int(raw, "token_dim")
    if token_dim is not None and token_dim != spec.token_dim:
        raise token_dim_mismatch(token_dim, spec, where=CONFIG_NAME)
    return AdapterConfig(peft_type, task_type, num_virtual_tokens, submodules, token_dim, raw)
