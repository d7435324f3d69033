"""`cm3leon serve`: a web UI over one model directory (optional extra: pip install 'cm3leon[ui]').

- `stream`: partial images while a generation runs (no UI dependency);
- `app`: the Gradio app, one tab per task;
- `cli`: the `cm3leon serve` subcommand."""
