"""`softprompt-server`: serve, and make a sample adapter.

Every Settings field is a flag of `serve` and a SOFTPROMPT_<NAME> variable; the flag wins over
the variable, which wins over the default (pydantic-settings gives init values priority). The
flags are generated from Settings so they cannot drift from it. Settings are built once here
and passed down; an invalid value stops startup with a message naming the flag.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import typing
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from server.config import Settings

log = logging.getLogger("softprompt.cli")
PROG = "softprompt-server"


def flag_of(field: str) -> str:
    return "--" + field.replace("_", "-")


def env_of(field: str) -> str:
    return "SOFTPROMPT_" + field.upper()


def default_of(field: str) -> Any:
    info = Settings.model_fields[field]
    value = info.get_default(call_default_factory=True)
    return value.value if isinstance(value, Enum) else value


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field. Unset flags are absent, so env and defaults apply."""
    for name, info in Settings.model_fields.items():
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS}
        annotation = info.annotation
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(annotation) is list:  # repeatable: --x a --x b, or --x a b
            kwargs.update(action="extend", nargs="+", metavar=name.upper())
        elif isinstance(annotation, type) and issubclass(annotation, Enum):
            kwargs["choices"] = [member.value for member in annotation]
        else:
            kwargs["metavar"] = name.upper()
        kwargs["help"] = (f"{info.description} [env {env_of(name)}; "
                          f"default: {default_of(name)}]")
        parser.add_argument(flag_of(name), **kwargs)


def settings_table() -> str:
    rows = [f"  {flag_of(n):<24} {env_of(n):<34} {default_of(n)}" for n in Settings.model_fields]
    return "serve options (flag, environment variable, default):\n" + "\n".join(rows)


def build_settings(values: dict[str, Any]) -> Settings:
    """Settings from CLI values over the environment; ValueError names the offending flag."""
    try:
        return Settings(**values)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = err.get("loc") or ()
            field = str(loc[0]) if loc else ""
            where = f"{flag_of(field)} (or {env_of(field)})" if field in Settings.model_fields \
                else "settings"
            message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            got = f" (got {err['input']!r})" if field and "input" in err else ""
            problems.append(f"{where}: {message}{got}")
        raise ValueError("; ".join(problems)) from e


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The flags that were given, over SOFTPROMPT_* variables, over the defaults."""
    return build_settings({k: v for k, v in vars(args).items() if k in Settings.model_fields})


def configure_logging(level: str) -> None:
    """Plain lines for the server log; the access log is one bare JSON object per line."""
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    access = logging.getLogger("softprompt.access")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)
    access.propagate = False  # its level is the root's: --log-level warning silences it


GIL_SWITCH_INTERVAL_S = 0.001


def serve(settings: Settings) -> int:
    import uvicorn

    from server.api.app import build_app
    from server.drain import DrainingServer
    from server.heap import cap_malloc_arenas, freeze_startup_heap

    cap_malloc_arenas()  # before any thread allocates (server.heap says why)
    # Off-loop workers (a large answer's logprobs, token strings, chat rendering) hold the
    # GIL in turns of the switch interval, and the event loop waits up to one whole turn
    # each time it takes the GIL back: at the default 5 ms, the dozen takes of one request
    # added up to 100 ms for a health check beside one heavy answer; at 1 ms, 36 ms.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    app = build_app(settings)
    keyring = app.state.keyring
    if keyring is not None:
        signal.signal(signal.SIGHUP, lambda *_: keyring.reload())
    engine = app.state.engine
    # The drain happens before uvicorn's shutdown; by then little is left, so its own grace
    # period only has to cover connections that linger after their last response.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                            access_log=False, log_level=str(settings.log_level), lifespan="on",
                            timeout_graceful_shutdown=2, timeout_keep_alive=settings.keep_alive_s)
    server = DrainingServer(config, app=app, drain_timeout_s=settings.drain_timeout_s)
    failed = threading.Event()

    def watch_model_load() -> None:
        # A model that cannot load (bad --model, --device cuda without CUDA, ...) must stop
        # the process, not leave it up answering 503 forever.
        try:
            engine.wait_until_ready()
        except Exception as e:  # noqa: BLE001 - reported and turned into the exit code
            log.error("startup failed: %s: %s", type(e).__name__, e)
            failed.set()
            server.should_exit = True
            return
        freeze_startup_heap()
        # --engine-process: an engine process that dies leaves nothing to serve with; exit
        # so the orchestrator restarts the replica rather than route to a 503-only one.
        wait_until_exited = getattr(engine, "wait_until_exited", None)
        if wait_until_exited is not None and wait_until_exited() and not app.state.draining:
            log.error("the engine process died; exiting")
            failed.set()
            server.should_exit = True

    if hasattr(engine, "wait_until_ready"):
        threading.Thread(target=watch_model_load, name="load-watch", daemon=True).start()
    server.run()
    code = 1 if failed.is_set() else 3 if server.drain_expired else 0  # 3: aborted at the deadline
    exit_past_lingering_threads(code)
    return code


def exit_past_lingering_threads(code: int) -> None:
    """End the process now if a non-daemon thread is left, which the interpreter would wait
    for at exit: an adapter-loader worker still reading from the store, a library's background
    thread (a hub download or conversion check). The drain and the engine's close are done by
    then, so nothing left is the server's work, and an orchestrator waiting on the exit (a
    rollout, the grace period) should not wait on them. The log names them."""
    left = [t.name for t in threading.enumerate()
            if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if not left:
        return
    log.info("exiting with %d; not waiting for thread(s) %s", code, ", ".join(left))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def make_sample_adapter(args: argparse.Namespace) -> int:
    from server.sample_adapter import write_sample_adapter

    out = write_sample_adapter(Path(args.out_dir), model=args.model,
                               model_cache=Path(args.model_cache),
                               num_virtual_tokens=args.num_virtual_tokens, seed=args.seed)
    print(f"wrote a PROMPT_TUNING adapter for {args.model} to {out}")
    print(f"upload it: curl -F adapter_id=sample -F config=@{out}/adapter_config.json "
          f"-F weights=@{out}/adapter_model.safetensors http://127.0.0.1:8000/v1/adapters")
    return 0


def store_gc(args: argparse.Namespace) -> int:
    """Unreferenced S3 versions cost storage only; an operator (or a CronJob) removes them."""
    if not args.store.startswith("s3://"):
        print(f"{args.store}: a local store collects its own garbage every time the server "
              "starts; nothing to do")
        return 0
    from server.engine.stores import open_store

    store = open_store(args.store, refresh_s=0)
    keys = store.collect_garbage(min_age_s=args.min_age_s,  # type: ignore[attr-defined]
                                 dry_run=args.dry_run)
    for key in keys:
        print(key)
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{verb} {len(keys)} unreferenced version objects older than {args.min_age_s:g} s",
          file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve many tenants' PEFT soft prompts on one frozen base model.",
        epilog=settings_table())
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve_parser = commands.add_parser(
        "serve", help="run the HTTP server", description="Run the HTTP server. Each flag "
        "overrides its SOFTPROMPT_* environment variable, which overrides the default.")
    add_settings_flags(serve_parser)
    sample = commands.add_parser(
        "make-sample-adapter", help="write a sample PEFT prompt-tuning adapter (offline)",
        description="Write adapter_config.json + adapter_model.safetensors, as PEFT's "
        "save_pretrained does for a randomly initialized PROMPT_TUNING adapter, sized for "
        "--model. Needs no PEFT and (for builtin models) no network.")
    sample.add_argument("out_dir", metavar="OUT_DIR", help="directory to write into")
    sample.add_argument("--model", default="builtin:tiny",
                        help="model the adapter is for (default: builtin:tiny)")
    sample.add_argument("--num-virtual-tokens", type=int, default=8,
                        help="virtual tokens (default: 8)")
    sample.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    sample.add_argument("--model-cache", default=str(default_of("model_cache")),
                        help="where builtin models are written (default: %(default)s)")
    gc = commands.add_parser(
        "store-gc", help="delete unreferenced adapter versions from an s3:// store",
        description="Delete version objects no adapter points to (left by a writer that died "
        "mid-upload, or a failed cleanup). Safe beside running replicas; only versions older "
        "than --min-age-s go, so uploads in progress are untouched. Endpoint and credentials "
        "from the AWS_* variables.")
    gc.add_argument("--store", default=os.environ.get("SOFTPROMPT_STORE", "./adapters"),
                    help="the server's --store (default: $SOFTPROMPT_STORE or ./adapters)")
    gc.add_argument("--min-age-s", type=float, default=3600.0,
                    help="only versions older than this (default: 3600)")
    gc.add_argument("--dry-run", action="store_true", help="list, do not delete")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "store-gc":
        from adapters_store.errors import AdapterStoreError

        try:
            return store_gc(args)
        except (AdapterStoreError, RuntimeError) as e:
            parser.exit(1, f"{PROG} store-gc: error: {e}\n")
    if args.command == "make-sample-adapter":
        try:
            return make_sample_adapter(args)
        except (ValueError, OSError) as e:
            parser.exit(2, f"{PROG} make-sample-adapter: error: {e}\n")
    try:
        settings = settings_from_args(args)
    except ValueError as e:
        parser.exit(2, f"{PROG} serve: error: {e}\n")
    if settings.api_keys is not None:
        from server.api.tenants import KeyFileError, parse_key_file

        try:
            parse_key_file(settings.api_keys)
        except KeyFileError as e:
            parser.exit(2, f"{PROG} serve: error: --api-keys: {e}\n")
    check_startup(parser, settings)
    configure_logging(str(settings.log_level))
    return serve(settings)


def check_startup(parser: argparse.ArgumentParser, settings: Settings) -> None:
    """What cannot work ends the process before it binds: one line naming the flag, exit 2."""
    from server.engine.model_source import ModelSourceError, check_model_source

    try:
        check_model_source(settings.model)
    except ModelSourceError as e:
        parser.exit(2, f"{PROG} serve: error: {e}\n")
    if settings.engine == "vllm":
        from server.engine.engine_choice import INSTALL_HINT, vllm_installed

        if not vllm_installed():
            parser.exit(2, f"{PROG} serve: error: --engine vllm needs vLLM: {INSTALL_HINT} "
                           "(a CPU machine: bash .ci/vllm-env); --engine builtin needs "
                           "nothing more\n")
    if settings.store.startswith("s3://"):
        try:
            import boto3  # noqa: F401
        except ImportError:
            parser.exit(2, f"{PROG} serve: error: --store {settings.store} needs boto3: "
                           "pip install 'softprompt-server[s3]'\n")


if __name__ == "__main__":
    sys.exit(main())
