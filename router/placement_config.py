"""The `placement:` section of the router's config: where a prompt is prefilled, and the cost model's figures."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Mode = Literal["auto", "always", "never"]


class PlacementConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Mode = Field(default="always", description="always: every prompt is prefilled on a prefill node and its KV "
                       "moved (when one is up); never: on the decode node itself; auto: whichever the cost model "
                       "says is sooner. Can be changed at run time (POST /admin/placement on the admin port)")
    chunk_chars: int = Field(default=256, gt=0, description="prompt characters per indexed prefix chunk")
    node_capacity_chunks: int = Field(default=4096, gt=0, description="chunks a node is believed to keep (LRU), "
                                      "to match its store's or prefix cache's budget")
    shared_store: bool = Field(default=False, description="the prefill nodes share a Redis tier: a prefix one of "
                               "them computed counts for all of them, at `shared_load_tokens_per_s`")
    shared_capacity_chunks: int = Field(default=65536, gt=0)
    shared_load_tokens_per_s: float = Field(default=50000.0, gt=0, description="start value; learned from legs "
                                            "whose prefix only the shared tier held")
    chars_per_token: float = Field(default=4.0, gt=0, description="start value; learned from replies' prompt_tokens")
    prefill_tokens_per_s: float = Field(default=2000.0, gt=0, description="start value; learned from prefill legs, "
                                        "with what each token of context adds (router/prefill_cost.py)")
    request_s: float = Field(default=0.05, ge=0, description="a prompt's fixed cost on the node computing it (a "
                             "forward pass), counted per prompt queued there; start value, learned from prefill legs")
    link_bytes_per_s: float = Field(default=1e9, gt=0, description="start value; learned from completed transfers")
    kv_bytes_per_token: int = Field(default=131072, gt=0, description="the model's KV bytes per prompt token "
                                    "(2 x layers x kv heads x head dim x dtype bytes)")
    local_penalty: float = Field(default=1.5, ge=1.0, description="a prompt prefilled on the decode node holds up "
                                 "the decodes running there: its compute counts this many times")
    remote_overhead_s: float = Field(default=0.02, ge=0, description="a prefill leg's fixed cost (its own request, "
                                     "the push target's handshake)")
    duplicate_weight: float = Field(default=1.0, ge=0, description="a prompt prefix another node is computing for "
                                    "us right now, computed again elsewhere, costs that compute this many times "
                                    "over (the fleet pays for it twice; nodes sharing cores or GPUs slow each "
                                    "other): concurrent prompts with one system prompt then queue behind the "
                                    "node computing it and hit its cache. 0: parallel copies are free")
    decode_load_s: float = Field(default=0.01, ge=0, description="cost of each request already on a decode node")
    reply_slack_tokens: int = Field(default=256, ge=0, description="a node's reported prefix hit this close to "
                                    "the indexed one agrees with it (nodes hit whole blocks or store chunks); "
                                    "further off, the index is corrected")
    learn: bool = Field(default=True, description="follow measured rates; false keeps the configured ones")
