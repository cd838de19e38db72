"""`meshpilot keys ...`: API keys of tenants, written straight to the key store the planner reads (auth.keys_path),
so an operator on the planner's host (or with its database) manages them without a key of their own."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from meshpilot.cli.options import ConfigOption, JsonOption, fail, load_config

keys_app = typer.Typer(help="API keys: who may call the planner, and for which tenant.", no_args_is_help=True)


def _store(config: ConfigOption):  # -> ApiKeyStore; imported lazily like every services module in the CLI
    """The planner's key store: its PostgreSQL database when planner.database_url is set, else auth.keys_path."""
    from services.common.auth import key_store

    return key_store(load_config(config))


def _when(seconds: float | None) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds") if seconds else ""


@keys_app.command()
def create(
    tenant: Annotated[str, typer.Option(help="The tenant the key acts for (lowercase letters, digits, '-').")],
    name: Annotated[str, typer.Option(help="What the key is for, shown by `keys list`.")] = "",
    json_output: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """Create a key and print it once: it is stored hashed and cannot be shown again."""
    store = _store(config)
    try:
        key, token = store.create(tenant, name)
    except ValueError as e:
        fail(str(e), 2)
    finally:
        store.close()
    if json_output:
        typer.echo(json.dumps({"key_id": key.key_id, "tenant": key.tenant, "name": key.name, "key": token}))
        return
    typer.echo(f"created key {key.key_id} for tenant {key.tenant}; send it as 'authorization: Bearer <key>':")
    typer.echo(token)


@keys_app.command("list")
def list_keys(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's keys.")] = None,
    json_output: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """List the keys (never their secrets), revoked ones included."""
    store = _store(config)
    try:
        keys = store.list(tenant)
    finally:
        store.close()
    if json_output:
        typer.echo(json.dumps([key.__dict__ for key in keys]))
        return
    table = Table("KEY ID", "TENANT", "NAME", "CREATED", "REVOKED", box=None)
    for key in keys:
        table.add_row(key.key_id, key.tenant, key.name, _when(key.create_time), _when(key.revoke_time))
    Console(soft_wrap=True).print(table)


@keys_app.command()
def revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (`keys list`).")], config: ConfigOption = None
) -> None:
    """Revoke a key: calls with it are refused within auth.key_cache_seconds."""
    store = _store(config)
    try:
        revoked = store.revoke(key_id)
    finally:
        store.close()
    if not revoked:
        fail(f"no active key {key_id[:40]!r}; `meshpilot keys list` shows them", 1)
    typer.echo(f"revoked key {key_id}")
