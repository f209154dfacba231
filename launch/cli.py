"""`kvbridge` command line: model generation, config checks, serving roles, local deployments, store admin, benches."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from transfer.config_errors import ConfigError


def _make_model(a: argparse.Namespace) -> None:
    from launch.tiny_model import make_tiny_model
    print(make_tiny_model(a.dir, a.size, a.seed))


def _check(a: argparse.Namespace) -> None:
    from launch.role_config import DeploymentConfig, load_config
    failed = False
    for path in a.files:
        try:
            cfg = load_config(path)
            if isinstance(cfg, DeploymentConfig):
                cfg.load()
            print(f"{path}: ok ({cfg.role})")
        except ConfigError as e:
            print(e, file=sys.stderr)
            failed = True
    sys.exit(1 if failed else 0)


def _serve(a: argparse.Namespace) -> None:
    from launch.role_config import RoleConfig, load_config
    cfg = load_config(a.file)
    if not isinstance(cfg, RoleConfig):
        raise SystemExit(f"{a.file}: role '{cfg.role}' is not a vLLM role (prefill, decode, both)")
    if a.listen_host:   # known only at start in a cluster: the pod IP (see launch/k8s_render.py)
        cfg = cfg.model_copy(update={"connector": cfg.connector.model_copy(update={"listen_host": a.listen_host})})
    cmd = cfg.vllm_command()  # holds no secret: the connector reads it from the environment or a file
    env = dict(os.environ, **cfg.env)
    warning = cfg.listener_warning(env)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
    print("exec:", " ".join(cmd), flush=True)
    os.execvpe(cmd[0], cmd, env)


def _up(a: argparse.Namespace) -> None:
    """Every process is stopped by then; a role that died while starting, or a deployment that never got
    healthy, ends with what happened and where its log is, not a traceback."""
    from launch.deployment import run_deployment
    try:
        run_deployment(a.file, demo=a.demo, log_dir=a.log_dir)
    except (TimeoutError, RuntimeError) as e:
        raise SystemExit(f"kvbridge up {a.file}: {e} (role logs in {a.log_dir})") from None


def _render_k8s(a: argparse.Namespace) -> None:
    from launch.k8s_render import render, write
    for path in write(render(a.file, a.image, a.secret_name), a.out):
        print(path)


def _render_dashboard(a: argparse.Namespace) -> None:
    from launch.grafana_dashboard import render_json
    with open(a.out, "w") as f:
        f.write(render_json())
    print(a.out)


def _status(a: argparse.Namespace) -> None:
    from launch.netns import NetnsError
    from launch.placement import PlacementGone
    from launch.status_view import show
    try:
        sys.exit(show(a.file, a.log_dir, a.json, a.watch))
    except KeyboardInterrupt:   # how --watch ends
        sys.exit(0)
    except (PlacementGone, NetnsError) as e:  # a graph with hosts: not running, or not root
        raise SystemExit(f"kvbridge status: {e}")


def _store(a: argparse.Namespace) -> None:
    from launch.netns import NetnsError, entered
    from launch.placement import PlacementGone
    from launch.store_cli import StoreAdminError, store_lines, store_nodes
    try:
        roles, inside = store_nodes(a.file, a.log_dir)
        if not roles:
            raise SystemExit(f"{a.file}: no prefill node keeps a store (connector.store)")
        with entered(inside):  # a graph with hosts: its router's host reaches every host
            print("\n".join(store_lines(a.sub, roles, getattr(a, "prompts", None), getattr(a, "parallel", 4))))
    except (StoreAdminError, PlacementGone, NetnsError) as e:
        raise SystemExit(f"kvbridge store: {e}")


def _router(a: argparse.Namespace) -> None:
    from router.app import main
    main(["--config", a.config] + (["--port", str(a.port)] if a.port else []))


def _nodes(a: argparse.Namespace) -> None:
    from launch.node_ctl import AdminError, nodes_command, placement_command
    try:
        out = placement_command(a.admin, a.mode) if a.cmd == "placement" else nodes_command(
            a.admin, a.verb, getattr(a, "kind", None), getattr(a, "name", None), getattr(a, "url", None),
            getattr(a, "kv_address", None), not getattr(a, "no_wait", False))
    except AdminError as e:
        raise SystemExit(str(e))
    print(json.dumps(out, indent=2))


def _bench(a: argparse.Namespace) -> None:
    from bench.transfer_bench import main
    main(a.args)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(prog="kvbridge", description="disaggregated prefill/decode for vLLM")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("make-tiny-model", help="generate a random-weight Llama + tokenizer")
    p.add_argument("dir")
    p.add_argument("--size", default="tiny", choices=["tiny", "bench"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_make_model)
    p = sub.add_parser("config", help="config tools")
    csub = p.add_subparsers(dest="sub", required=True)
    c = csub.add_parser("check", help="validate role, router or deployment YAML files")
    c.add_argument("files", nargs="+")
    c.set_defaults(fn=_check)
    p = sub.add_parser("serve", help="run one vLLM role (prefill/decode/both) from its YAML")
    p.add_argument("file")
    p.add_argument("--listen-host", help="override connector.listen_host (a pod IP in Kubernetes)")
    p.set_defaults(fn=_serve)
    p = sub.add_parser("up", help="start a whole deployment and wait for Ctrl-C")
    p.add_argument("file")
    p.add_argument("--demo", action="store_true", help="send demo requests, print results, stop")
    p.add_argument("--log-dir", default=".kvbridge/logs")
    p.set_defaults(fn=_up)
    p = sub.add_parser("status", help="health, load, slots, transfers, store and last errors of a running deployment")
    p.add_argument("file", nargs="?", default="configs/deployment.yaml")
    p.add_argument("--json", action="store_true")
    p.add_argument("--watch", type=float, metavar="SECONDS", help="redraw every SECONDS until Ctrl-C")
    p.add_argument("--log-dir", default=".kvbridge/logs", help="where `kvbridge up` writes the role logs")
    p.set_defaults(fn=_status)
    p = sub.add_parser("store", help="the prefix stores of a running deployment's prefill nodes")
    ssub = p.add_subparsers(dest="sub", required=True)
    for name, text in (("stats", "chunks and bytes per tier"),
                       ("clear", "remove every stored chunk (safe while serving: a request whose chunk is gone "
                                 "recomputes it; a shared Redis is cleared for every node)")):
        s = ssub.add_parser(name, help=text)
        s.add_argument("file", nargs="?", default="configs/deployment.yaml")
        s.add_argument("--log-dir", default=".kvbridge/logs", help="where `kvbridge up` writes the role logs")
        s.set_defaults(fn=_store)
    s = ssub.add_parser("warmup", help="prefill the prompts in PROMPTS (one per line, or .jsonl with a 'prompt' "
                                       "field) on every prefill node so their chunks are stored")
    s.add_argument("prompts")
    s.add_argument("file", nargs="?", default="configs/deployment.yaml")
    s.add_argument("--parallel", type=int, default=4, help="prompts in flight at once")
    s.add_argument("--log-dir", default=".kvbridge/logs", help="where `kvbridge up` writes the role logs")
    s.set_defaults(fn=_store)
    p = sub.add_parser("render", help="turn a deployment graph into manifests for another target")
    rsub = p.add_subparsers(dest="sub", required=True)
    r = rsub.add_parser("k8s", help="Kubernetes manifests: Deployments, Services, ConfigMap, Secret reference")
    r.add_argument("file")
    r.add_argument("-o", "--out", required=True, help="directory to write the manifests to")
    r.add_argument("--image", default="kvbridge:0.1.0", help="image holding vLLM, kvbridge and the model")
    r.add_argument("--secret-name", help="Secret with key 'secret' (default: DEPLOYMENT-kvbridge)")
    r.set_defaults(fn=_render_k8s)
    r = rsub.add_parser("dashboard", help="the Grafana dashboard JSON (shipped as configs/grafana-dashboard.json)")
    r.add_argument("-o", "--out", default="configs/grafana-dashboard.json")
    r.set_defaults(fn=_render_dashboard)
    p = sub.add_parser("router", help="run the OpenAI-compatible PD router")
    p.add_argument("--config", required=True)
    p.add_argument("--port", type=int)
    p.set_defaults(fn=_router)
    p = sub.add_parser("nodes", help="list, add or drain the router's nodes at run time (its admin port)")
    nsub = p.add_subparsers(dest="verb", required=True)
    for verb, help_ in (("list", "nodes, state, load, draining"), ("add", "add a prefill or decode node"),
                        ("drain", "no new requests; returns when those in flight are done, then removes it")):
        n = nsub.add_parser(verb, help=help_)
        n.add_argument("--admin", default="http://127.0.0.1:8000", help="the router's admin (or API) address")
        n.set_defaults(fn=_nodes)
        if verb == "add":
            n.add_argument("kind", choices=["prefill", "decode"])
            n.add_argument("name")
            n.add_argument("url")
            n.add_argument("--kv-address", help="a decode node's connector handshake host:port")
        if verb == "drain":
            n.add_argument("name")
            n.add_argument("--no-wait", action="store_true", help="return at once: the node takes nothing new "
                           "and stays listed, draining, until a drain that waits")
    p = sub.add_parser("placement", help="show the router's placement model, or pin its mode")
    p.add_argument("--mode", choices=["auto", "always", "never"])
    p.add_argument("--admin", default="http://127.0.0.1:8000")
    p.set_defaults(fn=_nodes)
    p = sub.add_parser("bench", help="benchmarks")
    bsub = p.add_subparsers(dest="sub", required=True)
    b = bsub.add_parser("transfer", help="NIXL transfer bench (see python -m bench.transfer_bench -h)")
    b.add_argument("args", nargs=argparse.REMAINDER)
    b.set_defaults(fn=_bench)
    a = ap.parse_args(argv)
    try:
        a.fn(a)
    except ConfigError as e:
        raise SystemExit(str(e))


if __name__ == "__main__":
    main()
