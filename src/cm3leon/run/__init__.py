"""A run: the chained pipeline over one dataset and what is built on a finished run folder.

- `config`: the pipeline presets (`cm3leon pipeline --preset`, `cm3leon demo`);
- `pipeline`: the command and the stage loop (resumable: a finished stage has a `.done` marker);
- `stages`: one function per stage (data, tokenizers, retrieval, pretraining, SFT, generation,
  evaluation, report);
- `summaries`: the stages' summaries, read: `RunFolder` and one typed reader per summary file
  (the report, the quality bar and RUN/metrics.json read them through these);
- `quality_bar`: the demo's quality bar judged on a run folder;
- `report`: the run report (report.html) from the stages' summaries;
- `folder`: what the comparisons reuse from a finished run folder (data, code shards, retriever);
- `ablate`, `baselines`, `ablate_cli`: ablations and the same-budget baselines on a run folder
  (`cm3leon ablate`).
"""
