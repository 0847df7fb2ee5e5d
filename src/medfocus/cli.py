"""The ``medfocus`` command.

Sub-commands live in :mod:`medfocus.commands` (one module per area) and are imported lazily, so
``medfocus --help`` stays fast and a missing optional dependency only affects its own command.
"""

from __future__ import annotations

import click

from medfocus.errors import ConfigError, MedfocusError
from medfocus.registry import LazyRegistry

#: command name -> "module:attribute" of a click command.
COMMANDS: LazyRegistry[click.Command] = LazyRegistry("command", {
    "evaluate": "medfocus.commands.evaluate:evaluate",
    "synth": "medfocus.commands.synth:synth",
    "synth-reference": "medfocus.commands.synth:synth_reference",
    "models": "medfocus.commands.models:models",
    "train-demo": "medfocus.training.commands:train_demo",
    "train-demo-sam": "medfocus.training.commands:train_demo_sam",
    "bench": "medfocus.commands.bench:bench",
    "attribute": "medfocus.commands.attribute:attribute",
    "report": "medfocus.commands.report:report",
    "explain": "medfocus.commands.explain:explain",
    "demo": "medfocus.commands.demo:demo",
    "status": "medfocus.commands.launch:status",
    "merge": "medfocus.commands.launch:merge",
})

_HELP = {
    "evaluate": "Score predicted boxes/heatmaps against expert boxes; write CSV/Markdown tables.",
    "synth": "Write a synthetic chest X-ray dataset (VinDr-CXR layout) with exact ground truth.",
    "synth-reference": "Write a reference pool of normal synthetic X-rays with 11 concept masks.",
    "models": "List the registered LVLMs and their families.",
    "train-demo": "Train the demo CXR-VQA LVLM on the synthetic world.",
    "train-demo-sam": "Train the demo box-prompted segmenter (offline MedSAM stand-in) on the synthetic world.",
    "bench": "Build causally filtered benchmarks (counterfactual editing + 3-step filter).",
    "attribute": "Run attribution methods (10 baselines + MedFocus) on a benchmark split.",
    "report": "Write the self-contained HTML report of a run.",
    "explain": "Explain the model's answer on your own films (DICOM/PNG/JPEG/TIFF): all methods + interactive viewer.",
    "demo": "Run the whole pipeline on the embedded synthetic world with the shipped demo model.",
    "status": "Per-shard progress and errors of a sharded run (--launcher local|slurm, or shards run by hand).",
    "merge": "Merge the shard outputs of a run folder (attribute or bench build) into its normal outputs.",
}


#: Exit status of a command stopped by Ctrl-C / SIGINT (the shell convention 128 + 2).
INTERRUPTED = 130


class LazyGroup(click.Group):
    """A click group whose commands are imported only when invoked (or asked for help)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return COMMANDS.names()

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        try:
            return COMMANDS.resolve(name)
        except ConfigError as exc:
            # Python unbinds ``exc`` when the except block ends: keep the message, not the name.
            reason = str(exc)

            @click.command(name=name, help=_HELP.get(name, ""))
            def _unavailable() -> None:
                raise click.ClickException(f"command {name!r} is unavailable: {reason}")

            return _unavailable

    def invoke(self, ctx: click.Context) -> object:
        # The one place a library error becomes a CLI error: one line naming the file/field, exit
        # status 1, no traceback (commands raise MedfocusError like any other caller would see).
        import warnings

        from medfocus.errors import DataWarning

        default_show = warnings.showwarning
        shown: set[str] = set()

        def show(message, category, filename, lineno, file=None, line=None):
            # A data warning is a message to the user about their file (it names it), not a report
            # about our source: one "Warning:" line on stderr, without Python's file:line and code line,
            # once per command (a film is read by several steps, each of which may warn about it).
            if isinstance(category, type) and issubclass(category, DataWarning):
                if str(message) not in shown:
                    shown.add(str(message))
                    click.echo(f"Warning: {message}", err=True)
            else:
                default_show(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        try:
            return super().invoke(ctx)
        except MedfocusError as exc:
            raise click.ClickException(str(exc)) from exc
        except KeyboardInterrupt:
            # not click's bare "Aborted!" with status 1 (a refused run, nothing computed): say what is kept
            click.echo("\nInterrupted: every result written before the interrupt is kept; rerun the same command to "
                       "resume where it stopped (attribute, explain, bench build, demo and train-demo resume; "
                       "synth writes its folder at the end and starts over).", err=True)
            ctx.exit(INTERRUPTED)
        finally:
            warnings.showwarning = default_show

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Short help without importing every command module.
        with formatter.section("Commands"):
            formatter.write_dl([(n, _HELP.get(n, "")) for n in COMMANDS.names()])


# show_default: every sub-command's help shows each option's default (inherited by the sub-contexts).
@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="medfocus")
def main() -> None:
    """medfocus: which part of a chest X-ray did the LVLM use, and do attribution methods find it?

    \b
    Quick start (synthetic world, shipped demo model, CPU):
        medfocus demo
    """


if __name__ == "__main__":  # pragma: no cover
    main()
