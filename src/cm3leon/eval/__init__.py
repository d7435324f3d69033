"""Evaluation: metrics and the report.

- `fid`: Fréchet distance with a pluggable feature extractor ("FID" only with InceptionV3);
- `captioning`: CIDEr-D and BLEU-4 as the COCO caption evaluation computes them;
- `vqa`: VQAv2 accuracy with the official answer normalisation;
- `shapes_metrics`: checker-based accuracy on the built-in shapes data;
- `report`: image grids, plots, tables and the self-contained HTML report.

Submodules are imported explicitly (`from cm3leon.eval.captioning import cider_d`) so that
importing one metric does not pull in torch or matplotlib."""
