"""`cascade serve` and `cascade ask`."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys

from cascade.cli import check_text
from cascade.config import Config, config_file, load_config
from cascade.errors import ConfigError
from cascade.ledger import _redact
from cascade.paths import ledger_url_problem
from cascade.types import GenerationRequest, Message


def _with_cli_overrides(cfg: Config, args: argparse.Namespace) -> Config:
    server, given = cfg.server, set()
    if getattr(args, "host", None) is not None and not args.host.strip():  # not the config's host, silently
        raise ConfigError("--host: empty address")
    if getattr(args, "host", None):
        server = server.model_copy(update={"host": args.host})
        given.add("server.host")
    if getattr(args, "port", None) is not None:
        if not 0 <= args.port <= 65535:
            raise ConfigError(f"--port: {args.port} is not a TCP port")
        server = server.model_copy(update={"port": args.port})
        given.add("server.port")
    ledger = cfg.ledger
    if getattr(args, "ledger", None) is not None:
        if not args.ledger.strip():  # not the config's ledger, silently
            raise ConfigError("--ledger: empty path")
        if why := ledger_url_problem(args.ledger):
            raise ConfigError(f"--ledger: {why}")
        ledger = ledger.model_copy(update={"path": args.ledger})
        given.add("ledger.path")
    out = cfg.model_copy(update={"server": server, "ledger": ledger})
    out._cli_overrides = frozenset(given)  # a reload leaves these as the command line said
    return out


#: the flags that set what an environment variable would (the flag wins: the variable is not read at all)
_FLAG_VARS = {"host": "CASCADE_HOST", "port": "CASCADE_PORT", "ledger": "CASCADE_LEDGER_PATH"}


def _load_with_flags(args: argparse.Namespace) -> Config:
    """The config file, the environment over it, the flags over both: a variable whose flag is given is not
    read (a bad value in it would refuse a command line that overrides it)."""
    import os

    given = {var for flag, var in _FLAG_VARS.items() if getattr(args, flag, None) is not None}
    environ = {k: v for k, v in os.environ.items() if k not in given}
    return _with_cli_overrides(load_config(args.config, environ=environ), args)


def _check_bind(host: str, port: int) -> None:
    """Bind the server's address once, before anything starts, so that a port in use or a host that is not
    this machine's is one line (uvicorn would log it after the models loaded, and exit 1)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(f"cannot bind {host}:{port}: {getattr(exc, 'strerror', None) or exc}") from None
    family, kind, proto, _, addr = infos[0]
    try:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            sock.bind(addr)
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise ConfigError(f"cannot bind {host}:{port}: {why[:1].lower()}{why[1:]}") from None


def _check_engine(cfg: Config) -> None:
    """Check what each backend needs before it loads (a model id that names nothing), then build the engine
    once (its ledger, its shadows) without loading any model: the errors the server would otherwise raise from
    its startup, as a traceback, come here as one line; and nothing is created (a new ledger) for a config
    whose tiers could not start."""
    from cascade.engine import Engine, check_backends

    check_backends(cfg)

    async def run() -> None:
        engine = await Engine.open(cfg)
        await engine.close()

    asyncio.run(run())


def cmd_serve(args: argparse.Namespace) -> int:
    import logging
    import os
    import signal

    if hasattr(signal, "SIGHUP"):  # a reload (systemctl reload, a logrotate hook) while models load must not
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # kill the server; the running server installs its own
    cfg = _load_with_flags(args)
    if cfg.server.port == 0:  # uvicorn would bind a random free port, which the banner could not name
        where = ("--port" if args.port is not None else
                 "environment variable CASCADE_PORT (server.port)" if os.environ.get("CASCADE_PORT") else "server.port")
        raise ConfigError(f"{where}: 0 would listen on a random port; give a port from 1 to 65535")
    _check_bind(cfg.server.host, cfg.server.port)
    _check_engine(cfg)

    from serving import create_app
    from serving.logs import configure_logging
    from serving.shutdown import run_server

    configure_logging(cfg.server.log_level, cfg.server.log_format)
    for warning in cfg.price_warnings():
        logging.getLogger("cascade.serve").warning(warning)

    app = create_app(cfg, config_path=config_file(args.config))
    host = f"[{cfg.server.host}]" if ":" in cfg.server.host else cfg.server.host  # an IPv6 address, as in a URL
    banner = (f"cascade-engine: serving policies {list(cfg.policies)} on http://{host}:{cfg.server.port}"
              f" (ledger {_redact(cfg.ledger_target())})")
    if cfg.server.log_format == "json":  # every line on stderr is a JSON object
        logging.getLogger("cascade.serve").info(banner)
    else:
        print(banner, file=sys.stderr, flush=True)
    run_server(app, app.state.drain, host=cfg.server.host, port=cfg.server.port, log_level=cfg.server.log_level,
               graceful_shutdown_s=cfg.server.graceful_shutdown_s, uvicorn_logging=cfg.server.log_format == "text")
    return 0


def _route_tiers(cfg: Config, model: str | None) -> set[str] | None:
    """The tiers a request for ``model`` may call: its policy's chain and the chains of the shadows sampled on
    it, or the one tier it names; None (every tier) for a name the engine will refuse."""
    name = model or cfg.default_policy_name
    if name in cfg.policies:
        tiers = set(cfg.policies[name].chain)
        for sh in cfg.shadows.values():
            if sh.of == name and sh.sample_rate > 0:
                tiers.update(sh.chain or ())
        return tiers
    return {name} if any(t.name == name for t in cfg.tiers) else None


def cmd_ask(args: argparse.Namespace) -> int:
    from cascade.engine import Engine, check_backends

    cfg = _load_with_flags(args)
    if args.max_tokens is not None and args.max_tokens < 1:
        raise ConfigError("--max-tokens must be >= 1")
    limit = cfg.server.max_tokens_limit  # the server's limit, as the HTTP endpoints apply it
    if args.max_tokens is not None and args.max_tokens > limit:
        raise ConfigError(f"--max-tokens: {args.max_tokens} is above this server's limit of {limit} "
                          "(server.max_tokens_limit)")
    if not args.question.strip():
        raise ConfigError("the question is empty: give it as the argument (cascade ask \"What is 2+2?\")")
    messages = []
    if args.system:
        messages.append(Message("system", args.system))
    messages.append(Message("user", args.question))
    request = GenerationRequest(messages=tuple(messages), max_tokens=args.max_tokens)
    # as `serve` does, for the tiers this question may call: no ledger is created if they could not start
    check_backends(cfg, _route_tiers(cfg, args.model))

    async def run():  # noqa: ANN202
        engine = await Engine.open(cfg)
        try:
            return await engine.run(request, model=args.model, endpoint="cli")
        finally:
            await engine.close()

    outcome = asyncio.run(run())
    rec = outcome.record
    if args.json:
        d = rec.to_dict()
        d["answer"] = outcome.result.text
        d["finish_reason"] = outcome.result.finish_reason
        print(json.dumps(d, indent=2))
        return 0
    print(outcome.result.text.strip())
    print()
    print(f"tier: {rec.tier}  confidence: {rec.confidence:.3f}  escalated: {str(rec.escalated).lower()}"
          f"  attempts: {len(rec.attempts)}  latency: {rec.latency_ms:.0f} ms")
    for a in rec.attempts:
        conf = "-" if a.confidence is None else f"{a.confidence:.3f}"
        print(f"  [{a.index}] {a.tier:<24} {a.decision:<9} conf={conf:<6} tokens={a.prompt_tokens}+{a.completion_tokens}"
              f"  cost=${a.cost_usd:.8f}  {a.reason}")
    print(f"cost: ${rec.cost_usd:.8f}  last tier alone: ${rec.baseline_cost_usd:.8f}"
          f"{' (estimated)' if rec.baseline_estimated else ''}  escalation waste: ${rec.escalation_waste_usd:.8f}")
    print(f"request id: {rec.request_id}")
    return 0


_KEY_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _yaml_str(text: str) -> str:
    """``text`` as a YAML flow scalar the config reads back as this very string: bare when YAML would, else
    quoted. Not only spaces, ':' and quotes need quotes: YAML reads 123, true, yes, on, null, 1.5, 0x1F and
    1_000 as numbers, booleans or null, which the config then refuses as a key's id or user tier."""
    import yaml

    if _KEY_ID.fullmatch(text):
        try:
            if yaml.safe_load(text) == text:
                return text
        except yaml.YAMLError:
            pass
    return json.dumps(text)  # a JSON string is a double-quoted YAML scalar


def cmd_keys_create(args: argparse.Namespace) -> int:
    from serving.auth import hash_key, new_key

    if not _KEY_ID.fullmatch(args.id):
        raise ConfigError(f"--id {args.id!r}: a key id is 1 to 64 letters, digits, '_', '.' or '-'")
    if not args.user_tier.strip():
        raise ConfigError("--user-tier: empty name")
    key = new_key()
    print(f"key (shown once, give it to the caller): {key}", file=sys.stderr)
    print("add to the config under auth.keys:", file=sys.stderr)
    print(f"  - {{id: {_yaml_str(args.id)}, user_tier: {_yaml_str(args.user_tier)}, "
          f"sha256: {_yaml_str(hash_key(key))}}}")
    return 0


#: below this, `cascade keys hash` warns that the key is weak (its digest is stored unsalted)
MIN_HAND_KEY_CHARS = 24


def cmd_keys_hash(args: argparse.Namespace) -> int:
    from serving.auth import hash_key

    if args.key is not None:
        key = args.key.strip()  # as the server reads a bearer token: a key pasted with a space still matches
    else:
        try:  # bytes that are not UTF-8: an error, or lone surrogates (as Python reads stdin in most locales)
            key = check_text(sys.stdin.readline(), "standard input").strip()
        except UnicodeDecodeError:
            raise ConfigError("standard input: not valid UTF-8 text") from None
    if not key:
        raise ConfigError("no key given (pass it as an argument or on standard input)")
    if len(key) < MIN_HAND_KEY_CHARS:
        # the config keeps the key's SHA-256 unsalted (fast to check per request): a leaked config gives a short
        # or guessable key away to a search of its digest, where a random 256-bit one (keys create) stays safe
        print(f"cascade: warning: a key of {len(key)} characters can be found from its SHA-256 in a leaked "
              f"config; use at least {MIN_HAND_KEY_CHARS} random characters (`cascade keys create` makes one)",
              file=sys.stderr)
    print(hash_key(key))
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    k = sub.add_parser("keys", help="create API keys and hash them for the config (keys are stored hashed)")
    ksub = k.add_subparsers(dest="keys_command", metavar="SUBCOMMAND")
    ksub.required = True
    p = ksub.add_parser("create", help="generate a new key; prints the config line with its SHA-256")
    p.add_argument("--id", required=True, help="key id recorded in the ledger (not secret)")
    p.add_argument("--user-tier", required=True, help="user tier the key belongs to")
    p.set_defaults(func=cmd_keys_create)
    p = ksub.add_parser("hash", help="print the SHA-256 of an existing key (argument or stdin)")
    p.add_argument("key", nargs="?")
    p.set_defaults(func=cmd_keys_hash)

    p = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP endpoint")
    p.add_argument("--config", help="config YAML (default: $CASCADE_CONFIG or the embedded CPU default)")
    p.add_argument("--host", help="bind address (default from config / $CASCADE_HOST)")
    p.add_argument("--port", type=int, help="port (default from config / $CASCADE_PORT)")
    p.add_argument("--ledger", help="ledger: a SQLite path or a postgresql:// URL (default from config / "
                                    "$CASCADE_LEDGER_PATH)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("ask", help="run the cascade once on a question and print the answer and its record")
    p.add_argument("question")
    p.add_argument("--config", help="config YAML (default: $CASCADE_CONFIG or the embedded CPU default)")
    p.add_argument("--model", help="policy or tier name (default: the config's default policy)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--ledger", help="ledger: a SQLite path or a postgresql:// URL (default from config / "
                                    "$CASCADE_LEDGER_PATH)")
    p.add_argument("--json", action="store_true", help="print the whole record as JSON")
    p.set_defaults(func=cmd_ask)
