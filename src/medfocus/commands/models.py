"""``medfocus models``: the LVLM registry."""

from __future__ import annotations

import click


@click.command("models", help="List the registered LVLMs and their families.\n\n\b\nExamples:\n  medfocus models\n  medfocus models --check")
@click.option("--check", is_flag=True, help="Also say whether each model's files are available locally (no download).")
def models(check: bool) -> None:
    """Print the model registry (built-ins + user YAML entries from $MEDFOCUS_MODELS)."""
    from medfocus.lvlm.registry import list_models, registry_problem, user_registry_path

    problem = registry_problem()
    if problem:  # the built-ins still list; the broken file is named, not silently skipped
        click.echo(f"warning: user entries ignored: {problem}", err=True)
    entries = list_models()
    width = max(len(n) for n in entries)
    for name, e in entries.items():
        line = f"{name:<{width}}  {e.family or '(auto)':<8} {e.hf_id}"
        if e.gated:
            line += "  [gated]"
        if check:
            line += "  " + ("available" if _available(e.hf_id) else "not available locally")
        click.echo(line)
        if e.description:
            click.echo(f"{'':<{width}}  {e.description}")
    click.echo(f"\nuser entries: {user_registry_path()} (YAML 'models: {{name: {{hf_id, family, canvas}}}}')")


def _available(hf_id: str) -> bool:
    """Local folder with a config and weights, or a complete snapshot in the HF cache (no network); the
    same test ``attribute``, ``explain``, ``bench build`` and ``load_lvlm`` apply before loading."""
    from medfocus.lvlm.loading import available_locally

    return available_locally(hf_id)
