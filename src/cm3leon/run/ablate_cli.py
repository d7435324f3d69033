"""`cm3leon ablate`: model size, retrieved documents k, decoding method and a DALL-E-style
baseline on one finished pipeline run, all on the same token budget (see cm3leon.run.ablate);
with --baselines, CM3Leon against a DALL-E-style and a latent-diffusion model at the same
training FLOPs and wall time (see cm3leon.run.baselines).

    cm3leon ablate --run runs/demo                  # quick preset, writes runs/demo/ablate/
    cm3leon ablate --run runs/demo --preset full    # the run's full pretraining budget per variant
    cm3leon ablate --run runs/demo --plan           # print the variants and stop
    cm3leon ablate --run runs/demo --baselines      # writes runs/demo/ablate/baselines/ (needs the [baselines] extra)
"""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("ablate", help="ablations on a finished run: model size, retrieval k, decoding, "
                                      "DALL-E-style baseline (same token budget)")
    p.add_argument("--run", required=True, help="run folder of `cm3leon demo` / `cm3leon pipeline` (its "
                                                "tokenize and retrieval stages are reused)")
    p.add_argument("--preset", choices=("quick", "full"), default="quick",
                   help="quick: CPU minutes; full: the run's full pretraining budget per variant (default quick)")
    p.add_argument("--out", default=None, help="output folder (default RUN/ablate, which the run report shows)")
    p.add_argument("--data", default=None, help="the run's dataset (default: found from the run folder)")
    p.add_argument("--only", default=None, help="comma-separated variant names to run (see --plan)")
    p.add_argument("--steps", type=int, default=None, help="override the budget's optimizer steps (all variants)")
    p.add_argument("--num-prompts", type=int, default=None, help="text->image prompts per evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="run finished variants again")
    p.add_argument("--plan", action="store_true", help="print the variants and what each trains, then stop")
    p.add_argument("--baselines", action="store_true",
                   help="instead of the ablation groups: CM3Leon, a DALL-E-style model and a latent-diffusion model "
                        "trained on the run's data for CM3Leon's training FLOPs and wall time (the run's pretraining "
                        "recipe; --preset does not apply, --steps does), quality vs compute; writes OUT/baselines/")
    p.set_defaults(func=_ablate)


def _ablate(args) -> int:
    from cm3leon.run.ablate import ablation_spec, plan_table, run_ablations

    if args.baselines:
        return _baselines(args)
    spec = ablation_spec(args.preset, args.run, steps=args.steps, num_prompts=args.num_prompts)
    if args.plan:
        print(plan_table(spec, args.seed))
        return 0
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    result = run_ablations(args.run, preset=args.preset, out=args.out, seed=args.seed, spec=spec, variants=only,
                           data=args.data, force=args.force)
    keys = ("name", "params", "k", "decoding", "both", "fd", "clip_score", "final_val_loss")
    print(json.dumps([{k: r.get(k) for k in keys} for r in result["rows"]], indent=1))
    return 0


def _baselines(args) -> int:
    from cm3leon.errors import CM3LeonError, require
    from cm3leon.run.ablate import run_ablations
    from cm3leon.run.baselines import baselines_spec, plan_text

    if args.only:
        raise CM3LeonError("--only selects ablation variants; --baselines runs its comparison as a whole")
    spec = baselines_spec(args.run, steps=args.steps, num_prompts=args.num_prompts)
    if args.plan:
        print(plan_text(spec))
        return 0
    require("diffusers", "baselines", "cm3leon ablate --baselines (the latent-diffusion baseline)")
    result = run_ablations(args.run, out=args.out, seed=args.seed, spec=spec, data=args.data, force=args.force,
                           baselines=True)
    keys = ("model", "budget", "params", "train_flops", "train_seconds", "decoding", "seconds_per_image", "both", "fd",
            "clip_score")
    print(json.dumps([{k: r.get(k) for k in keys} for r in result["rows"]], indent=1))
    return 0
