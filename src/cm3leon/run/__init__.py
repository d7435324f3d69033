"""A run: the chained pipeline over one dataset and what is built on a finished run folder.

- `config`: the pipeline presets (`cm3leon pipeline --preset`, `cm3leon demo`);
- `pipeline`: the command and the stage loop (resumable: a finished stage has a `.done` marker);
- `stages`: one function per stage (data, tokenizers, retrieval, pretraining, SFT, generation,
  evaluation, report);
- `report`: the run report (report.html) from the stages' summaries;
- `folder`: reading a finished run folder's inputs (data, tokenizers, code shards, retriever);
- `ablate`, `baselines`, `ablate_cli`: ablations and the same-budget baselines on a run folder
  (`cm3leon ablate`).
"""
