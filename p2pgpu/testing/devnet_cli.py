"""``scripts/devnet``: a local p2pgpu network you start once and then poke at.

``up`` starts N node processes on 127.0.0.1 (the first K of them providers,
each with an Ollama stand-in unless a real Ollama answers) and returns; the
processes keep running. Every later command (``status``, ``submit``,
``kill``, ``restart``, ``logs``, ``down``) finds them again through the
state file ``<dir>/devnet.json``, by PID and process start time, so a
recycled PID is never mistaken for a node and nothing is ever looked up or
killed by name. The directory is ``--dir``, else ``$P2PGPU_DEVNET_DIR``,
else ``./.devnet`` (``scripts/devnet`` sets the repository's ``.devnet/``).

All the process handling lives in ``p2pgpu.testing.devnet`` (the same code
the tests and benchmarks use); this module only parses arguments and prints.
Errors a user can act on are ``error: ...`` on stderr and exit status 1;
``status`` exits with 3 when any node is not running or not answering.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import httpx

from p2pgpu.core.units import format_coins
from p2pgpu.errors import P2PGPUError
from p2pgpu.executor import default_ollama_host
from p2pgpu.testing.devnet import DEFAULT_MODELS, STATE_FILE, Devnet, DevnetError, Namespaces, NodeProcess, entered_netns

ENV_DIR = "P2PGPU_DEVNET_DIR"
STATUS_TIMEOUT_S = 10.0
STATUS_NODE_DOWN = 3  # `status`'s exit status when a node is not running or not answering


class _Failed(click.ClickException):
    exit_code = 1

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.message}", err=True, file=file)


class _Group(click.Group):
    """Turns the errors a user can act on into ``error: ...`` and exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.Abort):
            raise  # RuntimeErrors too, but click's own: `--help` is Exit(0)
        except (DevnetError, P2PGPUError, RuntimeError) as exc:
            raise _Failed(str(exc)) from exc


def _dir_option(function: Callable) -> Callable:
    return click.option(
        "--dir", "root", type=click.Path(file_okay=False, path_type=Path), envvar=ENV_DIR, show_envvar=True,
        default=Path(".devnet"), show_default=True, help="Where the devnet lives.",
    )(function)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """A local p2pgpu network: node processes on 127.0.0.1 that outlive this command.

    Start with `scripts/devnet up --nodes 5 --providers 2`, then `status`,
    `submit`, `kill`, `restart`, `logs` and finally `down`.
    """


# ------------------------------------------------------------------------ up


def _ollama_answers(url: str) -> bool:
    try:
        response = httpx.get(url.rstrip("/") + "/api/version", timeout=1.0, trust_env=False)
        return response.status_code == 200 and "version" in response.json()
    except (httpx.HTTPError, ValueError):
        return False


def _clear_stopped(root: Path) -> None:
    """Remove a stopped devnet's files from ``root`` (only names a devnet makes)."""
    state = json.loads((root / STATE_FILE).read_text())
    for item in state.get("nodes", []):
        shutil.rmtree(root / item["data_dir"], ignore_errors=True)
        (root / item["log"]).unlink(missing_ok=True)
    for item in state.get("standins", []):
        (root / item["log"]).unlink(missing_ok=True)
    (root / state.get("genesis", "genesis.json")).unlink(missing_ok=True)
    (root / STATE_FILE).unlink(missing_ok=True)


def _prepare_dir(root: Path) -> str | None:
    """Make ``root`` ready for a fresh devnet; a note for the user, if any."""
    if (root / STATE_FILE).exists():
        running = Devnet.attach(root).running()
        if running:
            raise DevnetError(
                f"a devnet is already running in {root} ({len(running)} processes); "
                "stop it with `scripts/devnet down` or choose another --dir"
            )
        _clear_stopped(root)
        return f"removed the stopped devnet that was in {root}"
    if root.exists() and any(root.iterdir()):
        raise DevnetError(f"{root} is not empty and holds no devnet ({STATE_FILE}); choose another --dir")
    return None


@cli.command()
@click.option("--nodes", type=click.IntRange(1, 200), default=3, show_default=True, help="Node processes.")
@click.option("--providers", type=click.IntRange(0, 200), default=1, show_default=True,
              help="How many of them offer inference (node0, node1, ...).")
@_dir_option
@click.option("--tokens-per-second", type=click.FloatRange(min=0), default=50.0, show_default=True,
              help="Decode rate of each stand-in (0: unpaced).")
@click.option("--slots", type=click.IntRange(1, 1024), default=4, show_default=True,
              help="Jobs each provider runs at once.")
@click.option("--model", "models", multiple=True, metavar="NAME",
              help=f"A model the stand-ins serve (repeatable) [default: {', '.join(DEFAULT_MODELS)}].")
@click.option("--reply-tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="Tokens in a stand-in reply that ends on its own.")
@click.option("--heartbeat", type=float, default=1.0, show_default=True, help="Seconds between offers.")
@click.option("--offer-ttl", type=float, default=5.0, show_default=True, help="Seconds an offer stays valid.")
@click.option("--sync-interval", type=float, default=2.0, show_default=True,
              help="Seconds between ledger anti-entropy rounds.")
@click.option("--ollama-host", metavar="URL",
              help="Use this Ollama for every provider [default: $OLLAMA_HOST when it answers, else stand-ins].")
@click.option("--standin", is_flag=True, help="Always use stand-ins, even when a real Ollama answers.")
@click.option("--netns", is_flag=True,
              help="Each node in a network namespace of its own, so `partition` can cut the network (needs root).")
@click.option("--timeout", type=float, default=300.0, show_default=True, help="Seconds to wait for the nodes.")
def up(nodes: int, providers: int, root: Path, tokens_per_second: float, slots: int, models: tuple[str, ...],
       reply_tokens: int, heartbeat: float, offer_ttl: float, sync_interval: float, ollama_host: str | None,
       standin: bool, netns: bool, timeout: float) -> None:
    """Start a fresh network: a new genesis with coins for every node, an
    Ollama stand-in per provider, N nodes bootstrapped to node0."""
    if providers > nodes:
        raise click.BadParameter(f"more providers ({providers}) than nodes ({nodes})", param_hint="--providers")
    if offer_ttl <= heartbeat:
        raise click.BadParameter("must be longer than --heartbeat", param_hint="--offer-ttl")
    if ollama_host and standin:
        raise click.UsageError("--ollama-host and --standin contradict each other")
    if netns:
        if ollama_host:
            raise click.UsageError("--netns nodes cannot reach an Ollama outside their namespace; drop --ollama-host")
        standin = True
        Namespaces.check_usable()
    root = root.absolute()
    if ollama_host is not None:
        if not _ollama_answers(ollama_host):
            raise DevnetError(f"no Ollama answers at {ollama_host} (GET /api/version)")
    elif not standin and providers and _ollama_answers(default_ollama_host()):
        ollama_host = default_ollama_host()
    note = _prepare_dir(root)
    if note:
        click.echo(note)
    where = f"the Ollama at {ollama_host}" if ollama_host else f"a stand-in each ({tokens_per_second:g} tokens/s)"
    click.echo(f"Starting {nodes} nodes in {root} ({providers} providers with {where}) ...")
    net = Devnet(root, nodes, providers, tokens_per_second=tokens_per_second, heartbeat_s=heartbeat,
                 offer_ttl_s=offer_ttl, sync_interval_s=sync_interval, ollama_host=ollama_host,
                 models=tuple(models) or DEFAULT_MODELS, reply_tokens=reply_tokens, slots=slots, detach=True,
                 netns=netns)
    start = time.monotonic()
    try:
        net.up(timeout=timeout, progress=lambda line: click.echo(line, err=True))
    except BaseException as exc:
        click.echo(f"start-up failed ({exc!r}); stopping what was started ...", err=True)
        net.down()
        raise
    took = time.monotonic() - start
    rows = [[n.name, "provider" if n.provider else "consumer", str(n.pid), _short(n.peer_id), n.ip,
             _mib(n.rss()), str(n.data_dir.relative_to(root))] for n in net.nodes]
    click.echo(_table(["NAME", "ROLE", "PID", "PEER", "IP", "RSS", "DATA DIR"], rows))
    click.echo(f"\nAll {nodes} nodes answer on their local API ({took:.1f} s).")
    consumer = next((n for n in net.nodes if not n.provider), net.nodes[0])
    click.echo(f"Try:  scripts/devnet status\n      scripts/devnet submit --node {consumer.name} "
               f"--model {net.models[0]} \"why is the sky blue?\"\n"
               f"      scripts/devnet p2pgpu {consumer.name} wallet    "
               f"(any p2pgpu command, run against {consumer.data_dir})\n      scripts/devnet down")


# -------------------------------------------------------------------- status


def _short(peer_id: str | None) -> str:
    return "…" + peer_id[-8:] if peer_id else "-"


def _mib(size: int | None) -> str:
    return f"{size / 2**20:.0f} MiB" if size is not None else "-"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [headers, *rows])


def _count_jobs(client: Any) -> int | None:
    """Jobs the node knows, when its API has a jobs endpoint (``ApiClient.jobs``)."""
    if not hasattr(client, "jobs"):
        return None
    try:
        answer = client.jobs()
    except (P2PGPUError, TypeError):
        return None
    if isinstance(answer, dict):
        answer = answer.get("jobs")
    return len(answer) if isinstance(answer, list) else None


def _node_report(node: NodeProcess) -> dict[str, Any]:
    report: dict[str, Any] = {
        "name": node.name, "pid": node.pid if node.running else None, "up": node.running,
        "provider": node.provider, "peer_id": node.peer_id, "data_dir": str(node.data_dir),
        "rss_bytes": node.rss(), "status": None, "jobs": None, "error": None,
    }
    if not node.running:
        return report
    try:
        with node.api(timeout=STATUS_TIMEOUT_S) as client:
            report["status"] = client.status()
            report["jobs"] = _count_jobs(client)
    except P2PGPUError as exc:
        report["error"] = str(exc)
    return report


def collect(net: Devnet) -> dict[str, Any]:
    """Every node's status (asked in parallel), RSS and liveness."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        nodes = list(pool.map(_node_report, net.nodes))
    hashes = {r["status"].get("state_hash") for r in nodes if r["status"]}
    return {
        "dir": str(net.root),
        "network": net.genesis().name if net.genesis_path.exists() else None,
        "genesis_total": net.genesis().total_allocated if net.genesis_path.exists() else None,
        "nodes": nodes,
        "standins": [
            {"name": s.name, "pid": s.pid if s.running else None, "up": s.running, "host": s.host,
             "rss_bytes": s.rss()}
            for s in net.standins
        ],
        "state_hashes_equal": len(hashes) == 1 and all(r["status"] for r in nodes if r["up"]),
        "netns": ([net.namespaces.hub] + [net.namespaces.name(i) for i in range(net.count)]
                  if net.namespaces is not None else None),
        "partition": net.partitioned,
    }


def _node_row(report: dict[str, Any]) -> list[str]:
    info = report["status"] or {}
    role = info.get("role") or ("provider" if report["provider"] else "consumer")
    if not report["up"]:
        state = "down"
    elif report["error"]:
        state = "no API"
    else:
        state = "up"

    def coins(key: str) -> str:
        value = info.get(key)
        return format_coins(value) if type(value) is int else "-"

    return [
        report["name"], _short(report["peer_id"]), role, str(info.get("peers", "-")),
        str(info.get("offers_seen", "-")), coins("balance"), coins("held"),
        str(report["jobs"]) if report["jobs"] is not None else "-", _mib(report["rss_bytes"]), state,
        (info.get("state_hash") or "-")[:12],
    ]


@cli.command()
@_dir_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of tables.")
@click.pass_context
def status(ctx: click.Context, root: Path, as_json: bool) -> None:
    """A table per node: peers, offers seen, coins, jobs, memory, up/down.

    Exit status: 0 when every node is running and answers on its local API;
    3 when any node is not running or does not answer (the report is
    printed in full either way); 1 when there is no devnet to look at.
    """
    net = Devnet.attach(root)
    report = collect(net)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print_status(report)
    down = [r["name"] for r in report["nodes"] if not r["up"]]
    if down:
        click.echo(f"not running: {', '.join(down)} (`restart NAME` starts one again)", err=True)
    if down or not all(r["status"] for r in report["nodes"]):
        ctx.exit(STATUS_NODE_DOWN)


def _print_status(report: dict[str, Any]) -> None:
    headers = ["NAME", "PEER", "ROLE", "PEERS", "OFFERS", "BALANCE", "HELD", "JOBS", "RSS", "STATE", "LEDGER"]
    click.echo(_table(headers, [_node_row(r) for r in report["nodes"]]))
    if report["standins"]:
        rows = [[s["name"], str(s["pid"] or "-"), s["host"] or "-", _mib(s["rss_bytes"]), "up" if s["up"] else "down"]
                for s in report["standins"]]
        click.echo("\n" + _table(["STAND-IN", "PID", "URL", "RSS", "STATE"], rows))
    up_nodes = [r for r in report["nodes"] if r["up"]]
    answering = [r for r in up_nodes if r["status"]]
    summary = f"\n{len(up_nodes)}/{len(report['nodes'])} nodes up, {len(answering)} answering"
    states = len({r["status"]["state_hash"] for r in answering})
    if len(answering) > 1:
        summary += "; ledger state " + ("identical on all of them" if states == 1 else f"differs ({states} states)")
    click.echo(summary)
    if report["partition"]:
        click.echo("PARTITIONED: " + " | ".join(",".join(group) for group in report["partition"])
                   + " (nodes in no group: together); `heal` to reconnect")
    for r in report["nodes"]:
        if r["error"]:
            click.echo(f"{r['name']}: {r['error']}", err=True)


# --------------------------------------------------------------- using nodes


def _default_node(net: Devnet) -> NodeProcess:
    running = [n for n in net.nodes if n.running]
    if not running:
        raise DevnetError(f"no node of the devnet in {net.root} is running")
    return next((n for n in running if not n.provider), running[0])


def _p2pgpu(node: NodeProcess, args: list[str]) -> None:
    """Run a ``p2pgpu`` command against ``node``'s data dir, in this process."""
    from p2pgpu.cli import main

    with entered_netns(node.netns):  # its local API is on its own 127.0.0.1
        main(["--data-dir", str(node.data_dir), *args])


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@_dir_option
@click.option("--node", "name", metavar="NAME", help="The node that submits [default: the first running consumer].")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def submit(root: Path, name: str | None, args: tuple[str, ...]) -> None:
    """Run a job from one node and stream its tokens: `submit --model M PROMPT`.

    Everything after --node is `p2pgpu submit`'s (--max-tokens, --json ...).
    """
    net = Devnet.attach(root)
    node = net.node(name) if name else _default_node(net)
    if not node.running:
        raise DevnetError(f"{node.name} is not running (`scripts/devnet restart {node.name}`)")
    _p2pgpu(node, ["submit", *args])


@cli.command("p2pgpu", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@_dir_option
@click.argument("name", metavar="NODE")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def p2pgpu_command(root: Path, name: str, args: tuple[str, ...]) -> None:
    """Run any `p2pgpu` command against NODE: `p2pgpu node3 wallet --json`."""
    _p2pgpu(Devnet.attach(root).node(name), list(args))


@cli.command()
@_dir_option
@click.argument("name", metavar="NAME")
def kill(root: Path, name: str) -> None:
    """SIGKILL a node (or a stand-in) by its recorded PID: a crash."""
    net = Devnet.attach(root)
    target = net.process(name)
    pid = target.pid
    if net.kill(name):
        click.echo(f"killed {target.name} (pid {pid})")
    else:
        click.echo(f"{target.name} was not running")


@cli.command()
@_dir_option
@click.argument("name", metavar="NAME")
@click.option("--timeout", type=float, default=120.0, show_default=True)
def restart(root: Path, name: str, timeout: float) -> None:
    """Stop NAME if it runs and start it again (same data dir, same port)."""
    net = Devnet.attach(root)
    target = net.process(name)
    if isinstance(target, NodeProcess):
        net.restart(name, timeout)
        click.echo(f"{target.name} running again (pid {target.pid}, {target.listen_addr})")
    else:
        host = net.restart_standin(name, timeout)
        click.echo(f"{target.name} running again (pid {target.pid}, {host})")


@cli.command()
@_dir_option
@click.argument("groups", nargs=-1, required=True, metavar="A,B C,D ...")
def partition(root: Path, groups: tuple[str, ...]) -> None:
    """Cut the network between groups of nodes: `partition node0,node1 node2,node3`.

    Real cuts (each node has a network namespace of its own; the groups end
    up on separate bridges), so it needs a devnet started with `up --netns`.
    Nodes named in no group stay connected to each other. Nothing is reset:
    packets across the cut vanish, as across a real split, until `heal`.
    """
    net = Devnet.attach(root)
    net.partition([[name for name in group.split(",") if name] for group in groups])
    click.echo("partitioned: " + " | ".join(",".join(group) for group in net.partitioned or []))


@cli.command()
@_dir_option
def heal(root: Path) -> None:
    """Undo `partition`: every node on one network again."""
    net = Devnet.attach(root)
    net.heal()
    click.echo("healed: every node on one network again")


@cli.command()
@_dir_option
@click.option("--clean", is_flag=True, help="Also remove the devnet's files (data dirs, logs, state).")
@click.option("--timeout", type=float, default=10.0, show_default=True,
              help="Seconds after SIGTERM before SIGKILL.")
def down(root: Path, clean: bool, timeout: float) -> None:
    """Stop every process the devnet started (SIGTERM, then SIGKILL), by PID."""
    root = root.absolute()
    try:
        net = Devnet.attach(root)
    except DevnetError:
        click.echo(f"no devnet in {root}; nothing to stop")
        return
    running = net.running()
    net.down(timeout)
    left = net.running()
    if left:
        raise DevnetError("still running after SIGKILL: " + ", ".join(f"{p.name} (pid {p.pid})" for p in left))
    click.echo(f"stopped {len(running)} processes" if running else "nothing was running")
    if clean:
        _clear_stopped(root)
        try:
            root.rmdir()
        except OSError:
            pass
        click.echo(f"removed the devnet's files from {root}")


@cli.command()
@_dir_option
@click.argument("name", metavar="NAME")
@click.option("-n", "--lines", type=click.IntRange(min=0), default=40, show_default=True)
@click.option("-f", "--follow", is_flag=True, help="Keep printing what is appended (Ctrl-C to stop).")
def logs(root: Path, name: str, lines: int, follow: bool) -> None:
    """The last lines of a node's (or a stand-in's) log."""
    target = Devnet.attach(root).process(name)
    path = target.log_path
    try:
        with open(path, "rb") as log:
            tail = log.read().decode(errors="replace").splitlines()[-lines:] if lines else []
            for line in tail:
                click.echo(line)
            while follow:
                chunk = log.read()
                if chunk:
                    click.echo(chunk.decode(errors="replace"), nl=False)
                else:
                    time.sleep(0.2)
    except FileNotFoundError:
        raise DevnetError(f"no log yet at {path}") from None
    except KeyboardInterrupt:
        pass


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name=os.environ.get("P2PGPU_DEVNET_PROG", "devnet"))


if __name__ == "__main__":
    main(sys.argv[1:])
