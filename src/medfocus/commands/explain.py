"""``medfocus explain``: every attribution method on your own films, and the interactive viewer."""

from __future__ import annotations

import click

from medfocus.commands.launch import threads_option


EPILOG = """\b
Examples:
  # the shipped demo model on a DICOM film, all methods -> /tmp/x/explain.html
  medfocus explain film.dcm --finding cardiomegaly --out /tmp/x
  # two JPEGs, step-by-step answers, three methods
  medfocus explain a.jpeg b.jpeg --finding pneumonia --mode cot --method occlusion --method rise --method medfocus --out runs/ab
  # one film, your own question, an expert box (original pixels)
  medfocus explain film.png --question "Is the heart enlarged?" --box 700,900,1500,1500 --out runs/heart
  # explain a given answer instead of the model's own
  medfocus explain film.dcm --finding effusion --answer "No" --out runs/no
  # on a shared machine: at most 2 CPU threads
  medfocus explain film.dcm --finding cardiomegaly --threads 2 --out /tmp/x
"""


@click.command(name="explain", epilog=EPILOG)
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--finding", default=None, show_default="none: give --finding or --question", help="Ask the paper's question 'Is there evidence of FINDING in the image?'.")
@click.option("--question", default=None, show_default="the paper's question about --finding", help="Ask this question instead (the mode's instruction is appended).")
@click.option("--mode", type=click.Choice(["direct", "cot"]), default="direct", show_default=True,
              help="direct: a yes/no answer; cot: step by step (the whole rationale is explained).")
@click.option("--answer", default=None, show_default="the model's own greedy answer", help="Explain this answer text instead of the model's own greedy answer.")
@click.option("--model", default="demo", show_default=True, help="LVLM registry name or model folder.")
@click.option("--method", "methods", multiple=True, show_default="all registered methods", help="Attribution method (repeatable).")
@click.option("--param", "params", multiple=True, show_default="each method's own, listed in the README", help="Method parameter METHOD.NAME=VALUE, e.g. rise.n_masks=128 (repeatable).")
@click.option("--box", "boxes", multiple=True, show_default="none", help="Expert box x1,y1,x2,y2 in original pixels (repeatable; one film only).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder (records, heatmaps, explain.html).")
@click.option("--seed", type=int, default=0, show_default=True, help="Run seed.")
@click.option("--device", default=None, show_default="cuda if available, else cpu", help="torch device.")
@click.option("--overwrite", is_flag=True,
              help="Replace the explain run stored in --out, whatever its settings: every film and method is recomputed "
                   "(default: the same settings resume, a subset of its methods is served from it, other settings are refused).")
@threads_option
@click.option("--no-progress", is_flag=True, help="Disable progress bars (also the weight-loading bar).")
def explain(images, finding, question, mode, answer, model, methods, params, boxes, out_dir, seed, device, overwrite,
            threads, no_progress) -> None:
    """Explain the model's answer about each IMAGE (DICOM, PNG, JPEG, TIFF) with every attribution
    method and write OUT/explain.html, a self-contained interactive viewer (no network needed), plus
    the records (OUT/predictions.jsonl) in the normal schema. Exit status 3 when every record failed."""
    from medfocus.commands.attribute import exit_if_nothing_succeeded, parse_params
    from medfocus.lvlm.progress import progress_bars
    from medfocus.runner.explain import explain as run_explain, parse_box
    from medfocus.runner.threads import intra_op_threads

    # a MedfocusError becomes a click error in one place (cli.LazyGroup.invoke)
    with progress_bars(not no_progress), intra_op_threads(threads):
        res = run_explain(list(images), out=out_dir, finding=finding, question=question, mode=mode, answer=answer, model=model,
                          methods=list(methods) or None, params=parse_params(params), boxes=[parse_box(b) for b in boxes],
                          seed=seed, device=device, progress=not no_progress, overwrite=overwrite, notify=click.echo)
    for a in res.answers:
        if a["answer"] is None:  # refused or failed before the model answered: its records carry the error
            click.echo(f"{a['label']}: no answer (the film's records carry the error)")
        else:
            click.echo(f"{a['label']}: answer {a['answer']!r} (read as {a['answer_parsed']}; {a['answer_source']})")
    if res.served_from is not None:
        click.echo(f"served from the stored run in {res.out} (methods {', '.join(res.served_from)}; its explain.json "
                   "is kept, so a rerun with all of them resumes)")
    click.echo(f"done: {res.summary}")
    if res.summary.errors:
        click.echo(f"{res.summary.errors} records carry an error (see the viewer's cost table or the 'error' field)")
    click.echo(f"viewer: {res.html.resolve()}")
    exit_if_nothing_succeeded(res.summary.total, res.summary.total - res.summary.succeeded, res.out / "predictions.jsonl",
                              "rerun with --overwrite (a rerun with the same settings serves the stored errors)",
                              res.summary.error_keys)
