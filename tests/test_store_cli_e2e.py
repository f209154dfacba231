"""`kvbridge store` and vLLM's own transfer statistics against the shared real vLLM servers.

The prefill node of tests/conftest.py keeps a store (memory, disk, Redis) with its admin listener on; the
CLI reaches it from a deployment graph written from the running servers' own configs.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import yaml

from launch.cli import main
from launch.polling import wait_for
from launch.process_handle import ROOT
from launch.tiny_prompts import random_token_prompt
from tests.pd_client import connector_metrics, pd_request, post, text_of, vllm_metric_sum

CHUNK = 256


def _graph(tmp: Path, servers: dict) -> str:
    for name in ("prefill", "decode"):
        (tmp / f"{name}.yaml").write_text(yaml.safe_dump(servers[name].config.model_dump(mode="json")))
    (tmp / "router.yaml").write_text((ROOT / "configs" / "router.yaml").read_text())
    graph = {"role": "deployment", "name": "t", "prefill": ["prefill.yaml"], "decode": ["decode.yaml"],
             "router": "router.yaml"}
    (tmp / "deployment.yaml").write_text(yaml.safe_dump(graph))
    return str(tmp / "deployment.yaml")


def _run(capsys, *argv: str) -> dict[str, str]:
    """The CLI's lines for prefill-0, by tier."""
    capsys.readouterr()
    main(list(argv))
    out = capsys.readouterr().out
    return {ln.split()[1]: ln for ln in out.splitlines() if ln.startswith("prefill-0")}


def _complete(url: str, prompt: list[int]) -> str:
    status, reply = post(url, "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 8,
                                                  "temperature": 0})
    assert status == 200, reply
    return text_of(reply)


def test_warmup_stores_whole_chunks_and_clear_while_serving_keeps_answers(servers, tmp_path, capsys):
    pre, agg = servers["prefill"], servers["agg"]
    graph = _graph(tmp_path, servers)
    prompts = [random_token_prompt(600, 911), random_token_prompt(700, 912)]   # 2 whole chunks each
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in prompts))

    # the suite's earlier tests may have filled the memory tier (its count then stays put as chunks move down
    # to disk): start from an empty store, so the warm-up's chunks are what memory holds
    _run(capsys, "store", "clear", graph)
    warm = _run(capsys, "store", "warmup", str(tmp_path / "prompts.jsonl"), graph)
    assert "(+4 chunks stored by the warm-up)" in warm["memory"], warm
    stats = _run(capsys, "store", "stats", graph)
    assert int(stats["memory"].split()[2]) >= 4 and set(stats) == {"memory", "disk", "redis"}, stats

    # clear while the prefill serves requests that share the warmed prefixes: each answer stays right
    # (a chunk gone between its lookup and its load is a load error, recomputed)
    asks = [prompts[i % 2] + random_token_prompt(40, 920 + i) for i in range(4)]
    answers: dict[int, str] = {}
    workers = [threading.Thread(target=lambda i=i: answers.__setitem__(i, _complete(pre.url, asks[i])))
               for i in range(len(asks))]
    for w in workers:
        w.start()
    cleared = _run(capsys, "store", "clear", graph)
    for w in workers:
        w.join()
    assert "removed)" in cleared["memory"] and int(cleared["memory"].split("(")[1].split()[0]) >= 4, cleared
    assert [answers[i] for i in range(len(asks))] == [_complete(agg.url, a) for a in asks]
    # the store keeps storing after the clear
    (tmp_path / "after.jsonl").write_text(json.dumps({"prompt": random_token_prompt(300, 913)}))
    after = _run(capsys, "store", "warmup", str(tmp_path / "after.jsonl"), graph)
    assert "(+1 chunks stored by the warm-up)" in after["memory"], after


def test_vllm_metrics_and_log_report_kvbridge_transfers(servers, decode_pool_full_after):
    pre, dec, agg = servers["prefill"], servers["decode"], servers["agg"]
    pushed0 = connector_metrics(pre).get("kvbridge_transfer_pushed_bytes_total", 0.0)
    recv0 = vllm_metric_sum(dec.url, "vllm:kvbridge_recv_bytes_total")
    sent0 = vllm_metric_sum(pre.url, "vllm:kvbridge_send_seconds_count")
    exposed0 = vllm_metric_sum(pre.url, "vllm:kvbridge_exposed_seconds_count")
    prompt = random_token_prompt(700, 931)
    _, (status, reply) = pd_request(servers, "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 8,
                                                                 "temperature": 0})
    assert status == 200 and text_of(reply) == _complete(agg.url, prompt)
    pushed = connector_metrics(pre)["kvbridge_transfer_pushed_bytes_total"] - pushed0
    assert pushed > 0
    # vLLM publishes connector stats with a later step's output: wait for its series to move
    wait_for(lambda: vllm_metric_sum(dec.url, "vllm:kvbridge_recv_bytes_total") - recv0 == pushed, 20)
    # a push ends after its request did; the prefill engine reports it with its next step's output
    def pushes_counted() -> bool:
        _complete(pre.url, [1, 2, 3])
        return vllm_metric_sum(pre.url, "vllm:kvbridge_send_seconds_count") - sent0 == 1
    wait_for(pushes_counted, 20, interval=0.5)
    assert vllm_metric_sum(pre.url, "vllm:kvbridge_exposed_seconds_count") - exposed0 == 1
    # vLLM's own periodic log line (every 10 s while there is traffic) carries them too
    wait_for(lambda: "KV Transfer metrics: Num received transfers=" in dec.log_path.read_text(errors="replace"), 30)
