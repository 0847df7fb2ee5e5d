"""``medfocus models``: the LVLM registry."""

from __future__ import annotations

import click


@click.command("models", help="List the registered LVLMs and their families.\n\n"
               "Exit status 1 when the user registry ($MEDFOCUS_MODELS, else ~/.config/medfocus/models.yaml) cannot be "
               "used, and with --check also when one of its entries is not loadable locally (built-in hub models that "
               "are not downloaded are listed as such without failing the check).\n\n\b\nExamples:\n  medfocus models\n"
               "  medfocus models --check")
@click.option("--check", is_flag=True, help="Also say whether each model's files are available locally (no download).")
def models(check: bool) -> None:
    """Print the model registry (built-ins + user YAML entries from $MEDFOCUS_MODELS).

    Raises:
        ConfigError: ``$MEDFOCUS_MODELS`` names a file that does not exist (exit status 1).
        click.ClickException: the user registry file is invalid, or (``--check``) an entry of the user
            registry or a runtime entry is not loadable locally (exit status 1, after the listing).
    """
    from medfocus.lvlm.loading import local_availability
    from medfocus.lvlm.registry import list_models, registry_origin, registry_problem, user_registry_path

    entries = list_models(warn=False)  # a $MEDFOCUS_MODELS naming a missing file is an error here, as everywhere
    problem = registry_problem()
    width = max(len(n) for n in entries)
    failed: list[str] = []
    for name, e in entries.items():
        line = f"{name:<{width}}  {e.family or '(auto)':<8} {e.hf_id}"
        if e.gated:
            line += "  [gated]"
        if check:
            status = local_availability(e.hf_id)
            line += "  " + (status or "available")
            # A user's own entry that cannot load is a configuration error; a built-in hub model that is not
            # downloaded is the normal state of a fresh machine, so it is listed but does not fail the check.
            if status and registry_origin(name):
                failed.append(f"{name} ({status})")
        click.echo(line)
        if e.description:
            click.echo(f"{'':<{width}}  {e.description}")
    path = user_registry_path()
    click.echo(f"\nuser entries: {path}" + ("" if path.is_file() else " (no such file: built-in models only)")
               + " (YAML 'models: {name: {hf_id, family, canvas, description, gated}}')")
    if problem:  # the built-ins are still listed above; the broken file is named, not silently skipped
        raise click.ClickException(f"user entries ignored: {problem}")
    if failed:
        raise click.ClickException(f"{len(failed)} of your own model entries cannot be loaded locally: {'; '.join(failed)}")
