"""Retrieval augmentation (CM3Leon Sec. 2.2): a CLIP-style bi-encoder (`encoder`, `train`), a
FAISS memory bank (`index`), and the selection policy (`policy`).

Entry points: `load_retriever(dir)`, `train_retriever(...)`, `MemoryBank.load(dir)`,
`build_index(...)`, `compute_neighbors(...)`, `RetrievalPolicy`, `Retrieval`,
`retrieve_for_prompt(...)`. Imported lazily so `import cm3leon.retrieval` stays cheap."""

_EXPORTS = {
    "load_retriever": "cm3leon.retrieval.encoder",
    "make_clip_retriever": "cm3leon.retrieval.encoder",
    "Retriever": "cm3leon.retrieval.encoder",
    "train_retriever": "cm3leon.retrieval.train",
    "recall_at_k": "cm3leon.retrieval.train",
    "MemoryBank": "cm3leon.retrieval.index",
    "build_index": "cm3leon.retrieval.index",
    "compute_neighbors": "cm3leon.retrieval.index",
    "RetrievalPolicy": "cm3leon.retrieval.policy",
    "Retrieval": "cm3leon.retrieval.index",
    "retrieve_for_prompt": "cm3leon.retrieval.index",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cm3leon.retrieval' has no attribute {name!r}")
