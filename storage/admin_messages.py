"""The store's admin messages (`kvbridge store stats | clear`): msgpack maps, no pickle, validated.

They travel as the body of an authenticated control frame (transfer/control_auth.py), signed as sender
`admin` with the deployment secret, to the listener a prefill worker runs for its store
(storage/admin_server.py).
"""
from __future__ import annotations

from typing import Literal

import msgpack
from pydantic import BaseModel, ConfigDict, Field, ValidationError

ADMIN_SENDER = "admin"
_MAX_BYTES = 1 << 16


class AdminError(ValueError):
    """A message that is not a valid admin request or reply."""


class StoreAdminRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["store_admin"] = "store_admin"
    op: Literal["stats", "clear"]


class TierReport(BaseModel):
    model_config = ConfigDict(extra="forbid")
    chunks: int = Field(ge=0, description="chunks held (Redis: under the store's key prefix, by every node)")
    used_bytes: int = Field(ge=0, description="0 for Redis: its server owns memory")
    capacity_bytes: int = Field(ge=0, description="0 where the tier's server owns capacity (Redis)")
    removed: int = Field(default=0, ge=0, description="chunks removed by this request (clear)")


class StoreReport(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["store_report"] = "store_report"
    ok: bool = True
    error: str = ""
    tiers: dict[str, TierReport] = {}


def encode(msg: BaseModel) -> bytes:
    return msgpack.packb(msg.model_dump(mode="python"), use_bin_type=True)


def _decode(raw: bytes, model: type[BaseModel]) -> BaseModel:
    if len(raw) > _MAX_BYTES:
        raise AdminError(f"message of {len(raw)} bytes exceeds {_MAX_BYTES}")
    try:
        return model.model_validate(msgpack.unpackb(raw, raw=False))
    except (ValidationError, ValueError, TypeError, msgpack.UnpackException) as e:
        raise AdminError(f"not a valid {model.__name__}: {str(e)[:200]}") from e


def decode_request(raw: bytes) -> StoreAdminRequest:
    return _decode(raw, StoreAdminRequest)


def decode_report(raw: bytes) -> StoreReport:
    return _decode(raw, StoreReport)
