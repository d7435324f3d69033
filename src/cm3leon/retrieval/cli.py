"""`cm3leon retriever train | clip | eval` and `cm3leon index build | query | neighbors`."""

from __future__ import annotations

import json

from cm3leon.utils.units import torchrun


def register(sub) -> None:
    p = sub.add_parser("retriever", help="train a CLIP-style bi-encoder, or wrap local CLIP weights")
    rsub = p.add_subparsers(dest="retriever_command", metavar="ACTION")
    rsub.required = True

    t = rsub.add_parser("train", help="train a bi-encoder (byte-level text, CNN image) contrastively")
    t.add_argument("--data", required=True, help="dataset (any reader format)")
    t.add_argument("--out", required=True, help="output retriever folder")
    t.add_argument("--steps", type=int, default=None, help="training steps (default 300)")
    t.add_argument("--batch-size", type=int, default=None, help="pairs per step (default 128)")
    t.add_argument("--size", type=int, default=None, help="image side the encoder sees, px (default 32)")
    t.add_argument("--dim", type=int, default=None, help="embedding dimension (default 64)")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-3)")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=_train)

    c = rsub.add_parser("clip", help="make a retriever from local Hugging Face CLIP weights (paper: ViT-B/32)",
                        description="Wrap a local CLIP directory (what CLIPModel.save_pretrained or a hub "
                                    "snapshot of e.g. openai/clip-vit-base-patch32 contains: config.json, "
                                    "weights, tokenizer files) as a retriever. Nothing is downloaded.")
    c.add_argument("--clip-dir", required=True, help="local Hugging Face CLIP directory")
    c.add_argument("--out", required=True, help="output retriever folder")
    c.add_argument("--link", action="store_true",
                   help="point at --clip-dir instead of copying the weights into --out")
    c.set_defaults(func=_clip)

    e = rsub.add_parser("eval", help="text<->image recall@1/5 of a retriever on a dataset's test split")
    e.add_argument("--retriever", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--split", default=None, help="split to measure (default test, else val)")
    e.add_argument("--max-items", type=int, default=1000)
    e.set_defaults(func=_eval)

    p = sub.add_parser("index", help="build / query the FAISS memory bank; compute pretraining neighbours")
    isub = p.add_subparsers(dest="index_command", metavar="ACTION")
    isub.required = True

    b = isub.add_parser("build", help="embed a dataset split and index it (resumable)")
    b.add_argument("--data", required=True, help="dataset (any reader format)")
    b.add_argument("--retriever", required=True, help="retriever folder")
    b.add_argument("--out", required=True, help="output index folder")
    b.add_argument("--index-type", choices=("flat", "ivf", "ivfpq"), default="flat",
                   help="flat = exact inner product (default); ivf / ivfpq for millions of documents")
    b.add_argument("--split", default="train", help="split to index: train (default), val, test or all")
    b.add_argument("--codes", default=None, help="tokenized directory: record each document's code index and image codes")
    b.add_argument("--nlist", type=int, default=None, help="IVF lists (default ~sqrt(n))")
    b.add_argument("--nprobe", type=int, default=None, help="IVF lists searched per query (default 16)")
    b.add_argument("--pq-m", type=int, default=None, help="PQ sub-quantisers (default: dim/2, at most 64)")
    b.add_argument("--pq-nbits", type=int, default=8, help="bits per PQ code (default 8)")
    b.add_argument("--refine", type=int, default=16,
                   help="IVF-PQ: re-rank refine*k compressed hits exactly with the stored vectors (1 = off; default 16: "
                        "on 225,000 32-dim vectors in the default 16-byte codes, recall@10 was 0.96 at 4, 0.996 at 16)")
    b.add_argument("--batch-size", type=int, default=256)
    b.add_argument("--chunk-size", type=int, default=8192, help="documents per resumable embedding chunk")
    b.add_argument("--workers", type=int, default=1,
                   help="embedding processes, each taking whole input shards (a webdataset's .tar shards; a "
                        "captions.jsonl folder or COCO JSON is one unit, so one process embeds it). The index "
                        "does not depend on it (default 1): each worker keeps this process's torch threads, since CPU vectors' "
                        "last bits depend on the thread count (with few cores, lower OMP_NUM_THREADS for every run "
                        "you compare). Under torchrun each rank is one worker (torchrun sets OMP_NUM_THREADS=1)")
    b.set_defaults(func=_build)

    q = isub.add_parser("query", help="print the nearest documents to a text or an image")
    q.add_argument("text", nargs="?", default=None, help="query text")
    q.add_argument("--index", required=True, help="index folder")
    q.add_argument("--retriever", default=None, help="retriever folder (default: the one the index was built with)")
    q.add_argument("--image", default=None, help="query image file")
    q.add_argument("--k", type=int, default=5)
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_query)

    n = isub.add_parser("neighbors", help="retrieve k documents for every record once: CODES/neighbors.npy")
    n.add_argument("--index", required=True, help="index folder (of the train split)")
    n.add_argument("--codes", required=True, help="tokenized directory; neighbors.npy/.json are written here")
    n.add_argument("--k", type=int, default=2, help="documents per record (paper: 2)")
    n.add_argument("--seed", type=int, default=0, help="query-dropout seed")
    n.add_argument("--data", default=None, help="dataset (default: the one the index was built from)")
    n.add_argument("--retriever", default=None, help="retriever folder (default: the index's)")
    n.add_argument("--max-relevance", type=float, default=0.9, help="skip candidates above this relevance (paper 0.9)")
    n.add_argument("--query-dropout", type=float, default=0.2, help="query token dropout in training (paper 0.2)")
    n.add_argument("--num-candidates", type=int, default=64, help="hits fetched per query modality before filtering")
    n.add_argument("--batch-size", type=int, default=256, help="queries embedded and searched together")
    n.add_argument("--workers", type=int, default=1,
                   help="search processes, each taking whole input shards (a webdataset's .tar shards; a "
                        "captions.jsonl folder or COCO JSON is one unit, so one process searches it), each "
                        "loading the bank. neighbors.npy/.json do not depend on it (default 1): each worker keeps "
                        "this process's torch and FAISS threads. Under torchrun each rank is one worker")
    n.set_defaults(func=_neighbors)


def _train(args) -> int:
    from cm3leon.retrieval.train import train_retriever

    m = train_retriever(args.data, args.out, steps=args.steps, batch_size=args.batch_size, size=args.size,
                        seed=args.seed, dim=args.dim, lr=args.lr)
    print(json.dumps({k: v for k, v in m.items() if k != "train_config"}, indent=2))
    return 0


def _clip(args) -> int:
    from cm3leon.retrieval.encoder import make_clip_retriever

    print(json.dumps(make_clip_retriever(args.clip_dir, args.out, copy=not args.link), indent=2))
    return 0


def _eval(args) -> int:
    from cm3leon.retrieval.encoder import load_retriever
    from cm3leon.retrieval.train import evaluate_retriever

    print(json.dumps(evaluate_retriever(load_retriever(args.retriever), args.data, args.split, args.max_items), indent=2))
    return 0


def _build(args) -> int:
    from cm3leon.retrieval.index import build_index

    info = build_index(args.data, args.retriever, args.out, index_type=args.index_type, split=args.split,
                       codes=args.codes, batch_size=args.batch_size, chunk_size=args.chunk_size, nlist=args.nlist,
                       pq_m=args.pq_m, pq_nbits=args.pq_nbits, nprobe=args.nprobe, refine=args.refine,
                       workers=args.workers)
    if torchrun()[0] == 0:  # once under torchrun
        print(json.dumps(info, indent=2))
    return 0


def _query(args) -> int:
    from PIL import Image

    from cm3leon.errors import CM3LeonError
    from cm3leon.retrieval.encoder import load_retriever
    from cm3leon.retrieval.index import MemoryBank, retrieve_for_prompt

    if args.text is None and args.image is None:
        raise CM3LeonError("give a query text, --image FILE, or both")
    bank = MemoryBank.load(args.index)
    rdir = args.retriever or bank.retriever_path
    if rdir is None:
        raise CM3LeonError(f"{args.index}/index.json records no retriever; pass --retriever DIR")
    image = None
    if args.image:
        try:
            image = Image.open(args.image).convert("RGB")
        except OSError as e:
            raise CM3LeonError(f"--image {args.image}: cannot read ({e})") from None
    hits = retrieve_for_prompt(load_retriever(rdir), bank, text=args.text, image=image, k=args.k)
    if args.json:
        print(json.dumps([{k: v for k, v in h.items() if k != "image_codes"} for h in hits], indent=2))
    else:
        for rank, h in enumerate(hits, 1):
            print(f"{rank:2d}  {h['score']:.4f}  {h['key']}  {h['text']}")
    return 0


def _neighbors(args) -> int:
    from cm3leon.retrieval.index import compute_neighbors
    from cm3leon.retrieval.policy import RetrievalPolicy

    policy = RetrievalPolicy(max_relevance=args.max_relevance if args.max_relevance > 0 else None,
                             query_dropout=args.query_dropout, num_candidates=args.num_candidates)
    s = compute_neighbors(args.index, args.codes, k=args.k, seed=args.seed, policy=policy, data=args.data,
                          retriever=args.retriever, batch_size=args.batch_size, workers=args.workers)
    if torchrun()[0] == 0:  # once under torchrun
        print(json.dumps(s, indent=2))
    return 0
