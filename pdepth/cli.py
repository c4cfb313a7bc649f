"""Command line: ``pdepth run`` (the protocol, :mod:`pdepth.protocol`), ``pdepth score``
(a model trained elsewhere, :mod:`pdepth.model_score`), ``pdepth report DIR``
and ``pdepth improve DIR`` (:mod:`pdepth.improve`).

Exit status: 0 on success; 2 on an error the user can fix (bad arguments, a missing dataset or
optional dependency, an output directory that cannot be used, a damaged run file), reported
as one line ``pdepth: error: ...`` on stderr with nothing half-written; 1 when a rank of a
distributed run failed; 130 on Ctrl-C. Anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import math
import sys

from .data import DATASETS
from .models import ARCHITECTURES
from .ops import FILTERS, METRICS

__all__ = ["main"]

MAX_SEED_COUNT = 1000  # --seeds N: at most 1,000 seeds (2,000 models); a list names any seeds


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error contract: one line ``pdepth: error: ...``, exit 2."""

    def error(self, message: str):
        _err(f"{self.prog}: {message} (see {self.prog} --help)")
        sys.exit(2)


def _seeds(text: str) -> list[int]:
    """``"3"`` -> seeds 0, 1, 2; ``"0,5,7"`` (or ``"5,"``) -> those seeds (their range is
    checked by :func:`pdepth.protocol.config.check_seeds`)."""
    try:
        if "," in text:
            return [int(s) for s in text.split(",") if s.strip()]
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--seeds takes a count (e.g. 2) or a comma-separated list (e.g. 0,1), got {text!r}"
        ) from None
    if not 1 <= count <= MAX_SEED_COUNT:
        raise argparse.ArgumentTypeError(f"--seeds count must be in 1..{MAX_SEED_COUNT}, got "
                                         f"{count} (a comma-separated list names the seeds)")
    return list(range(count))


def _subset(text: str) -> int | str | None:
    """``all`` (or ``none``) -> None, every example; else the number, checked by
    :class:`~pdepth.protocol.RunConfig` (0 is refused there, not taken for ``all``)."""
    if text.strip().lower() in ("all", "none"):
        return None
    try:
        return int(text)
    except ValueError:
        return text  # refused by RunConfig, naming --subset


def _parser() -> argparse.ArgumentParser:
    from .protocol import RunConfig
    from .protocol.config import MAX_SEED, MIN_MEMORY_BUDGET

    d = RunConfig()
    p = _Parser(
        prog="pdepth", description="Prediction depth (Baldock et al. 2021), end to end.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser(
        "run", help="train models on random halves and compute prediction depth",
        description="Split the data 50/50 per seed, train a model on each half, compute "
                    "prediction depth of every example in and out of the training split, write "
                    "results.parquet, per-model arrays, config.json and report.html.")
    r.add_argument("--dataset", default=d.dataset, choices=list(DATASETS),
                   help="dataset (default: %(default)s, from the Debian package "
                        "dataset-fashion-mnist; imagefolder: --root DIR with one folder of "
                        "images per class)")
    r.add_argument("--root", default=None,
                   help=f"dataset folder (default: {DATASETS[d.dataset].root} for "
                        f"fashion-mnist, {DATASETS['cifar10'].root} for the torchvision "
                        "datasets; required for imagefolder)")
    r.add_argument("--download", action="store_true",
                   help="let torchvision download the dataset into --root where it is missing "
                        "(needs the internet)")
    r.add_argument("--workers", type=int, default=d.workers,
                   help="DataLoader processes decoding the images of imagefolder / a Dataset "
                        "(default: %(default)s, in the main process)")
    r.add_argument("--image-size", type=int, default=None, metavar="S",
                   help="imagefolder: resize every image to S x S (default: 32)")
    r.add_argument("--arch", default=None, choices=list(ARCHITECTURES),
                   help=f"architecture (default: {d.arch})")
    r.add_argument("--model", default=None, metavar="MODULE:FACTORY",
                   help="your own network: a callable in an importable module returning an "
                        "nn.Module, called with the keywords it takes among num_classes, "
                        "in_channels, image_size (or in_chans, img_size) (instead of --arch)")
    r.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a keyword for --model's factory (repeatable; VALUE a Python literal, "
                        "else a string), e.g. drop_rate=0.1")
    r.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="already-trained weights (a state dict, loaded with "
                        "torch.load(weights_only=True)) for --arch / --model: depth is "
                        "computed without training, one model, every example in its training "
                        "split")
    r.add_argument("--probes", default=None,
                   help="a probe preset (auto, cnn, convnext, mlp, resnet, resnet18, swin, "
                        "vgg, vgg16, vit) or comma-separated module names in the order the "
                        "network's forward pass runs them (default: the architecture's "
                        "preset; auto for --model: an error for a model it does not know)")
    r.add_argument("--token", default=None, choices=("cls", "mean", "all"),
                   help="how transformer block outputs [B, tokens, C] are probed: the class "
                        "token, the mean over the patch tokens, or all tokens (default: the "
                        "preset's: cls where the model has a class token, else mean)")
    r.add_argument("--seeds", type=_seeds, default=None,
                   help=f"number of seeds, or a comma-separated list of seeds in 0..{MAX_SEED} "
                        "(default: 5 = seeds 0-4; each seed trains 2 models; one seed with "
                        "--checkpoint)")
    r.add_argument("--epochs", type=int, default=None,
                   help=f"epochs (default: {d.epochs}; none with --checkpoint)")
    r.add_argument("--el2n-epoch", type=int, default=None,
                   help="the epoch (1..--epochs) whose EL2N the el2n score reads "
                        "(docs/scores.md; default: a fifth of --epochs, rounded half up, at "
                        "least 1); changes no model")
    r.add_argument("--subset", type=_subset, default=d.subset,
                   help="random subset of the training set, at least 4 examples ('all' "
                        "for every example; default: %(default)s)")
    r.add_argument("--k", type=int, default=d.k, help="k-NN neighbours (default: %(default)s)")
    r.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate (default: "
                                                          "%(default)s)")
    r.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="training batch size (default: %(default)s)")
    r.add_argument("--max-dim", type=int, default=d.max_dim,
                   help="pool conv maps to at most this many features (0: no pooling; "
                        "default: %(default)s)")
    r.add_argument("--memory-budget", type=float, default=d.memory_budget / 2**20,
                   help="MiB of embeddings a model's scoring may hold in RAM; beyond it they "
                        "go to a disk cache in OUT/cache, read one probe at a time in blocks "
                        f"of this size; at least {MIN_MEMORY_BUDGET // 2**20} (smaller "
                        "blocks never finish; default: %(default).0f)")
    r.add_argument("--keep-cache", action="store_true",
                   help="keep the disk cache of embeddings (OUT/cache/*.emb*.npy, one "
                        "float32 .npy file per probe and model, rows: training half then "
                        "held-out half) instead of deleting it after each model")
    r.add_argument("--device", default=d.device,
                   help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    r.add_argument("--knn-filter", default=d.knn_filter, choices=list(FILTERS),
                   help="the GEMM format the k-NN filters candidates with (tf32: CUDA only); "
                        "speed only: the results are identical, and a run may be resumed "
                        "with another one (default: %(default)s, the fastest exact one)")
    r.add_argument("--metric", default=d.metric, choices=list(METRICS),
                   help="the k-NN metric: euclidean (squared L2) or cosine (rows L2-normalised "
                        "first, then squared L2; docs/design.md section 2); it changes the "
                        "results and the protocol key (default: %(default)s)")
    r.add_argument("--label-noise", type=float, default=d.label_noise, metavar="P",
                   help="flip a fraction P (0 <= P < 1) of the labels to another class before "
                        "the halves are drawn (seeded; results.parquet keeps original_label "
                        "and label_flipped; default: %(default)s)")
    r.add_argument("--noise-kind", default=d.noise_kind, metavar="KIND",
                   help="which labels --label-noise flips and to what: uniform (any other "
                        "class), asymmetric (the dataset's fixed class map: fashion-mnist, "
                        "mnist, cifar10) or confusion (drawn from --noise-matrix); "
                        "docs/protocol.md, Label noise (default: %(default)s)")
    r.add_argument("--noise-matrix", default=None, metavar="FILE",
                   help="--noise-kind confusion: a C x C row-stochastic matrix (.npy or .csv), "
                        "row i = p(new label | class i), or heldout:RUN_DIR (the confusion of "
                        "a finished run's held-out predictions); the diagonal is ignored (a "
                        "flipped label always changes)")
    r.add_argument("--out", default="runs/pdepth", help="output directory (default: "
                                                        "%(default)s)")
    r.add_argument("--overwrite", action="store_true",
                   help="replace the pdepth run in --out, deleting only the files pdepth "
                        "wrote (an unfinished run with the same settings is resumed without "
                        "it; a directory with other files is always refused)")
    r.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    _score_parser(sub, d)
    rep = sub.add_parser("report", help="redraw the figures and report.html of a run directory")
    rep.add_argument("dir", help="a directory written by `pdepth run`")
    imp = sub.add_parser(
        "improve", help="retrain without / with fixed flagged labels; test accuracy",
        description="Retrain the run's architecture on the run's examples: all labels as "
                    "given (baseline), the label_error examples removed, relabelled to "
                    "suggested_label, and cleanlab's flags removed; evaluate each on the "
                    "dataset's test split and write DIR/improve.json.")
    imp.add_argument("dir", help="a finished directory written by `pdepth run`")
    imp.add_argument("--epochs", type=int, default=None,
                     help="training epochs of every variant (default: the run's)")
    imp.add_argument("--device", default="cpu",
                     help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    imp.add_argument("--seeds", type=_seeds, default=[0],
                     help="training seeds: a count (3 = seeds 0,1,2) or a comma-separated "
                          "list; every variant trains once per seed, test_accuracy is the "
                          "mean (default: 1 = seed 0)")
    imp.add_argument("--no-cleanlab", action="store_true",
                     help="skip the cleanlab_remove variant")
    imp.add_argument("--model", default=None, metavar="MODULE:FACTORY",
                     help="a run of your own --model: name it again (it must equal the "
                          "run's; nothing named in a run folder is imported on its own)")
    imp.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    _prune_parser(sub)
    return p


def _prune_parser(sub) -> None:
    """``pdepth prune``'s flags (docs/prune.md)."""
    from .prune import DEFAULT_BINS, DEFAULT_KEEP, DEFAULT_SCORES

    pr = sub.add_parser(
        "prune", help="pruning curves: retrain on the examples a score keeps; test accuracy",
        description="Retrain the run's architecture on subsets of the run's examples chosen "
                    "by score columns of results.parquet (the easiest or hardest removed, or "
                    "a stratified draw), and on all of them, once per seed; evaluate each on "
                    "the dataset's test split and write DIR/prune.json, DIR/prune/*.npy "
                    "(the kept dataset_index values) and figures/pruning.png. Resumable. "
                    "See docs/prune.md.")
    pr.add_argument("dir", help="a finished directory written by `pdepth run`")
    pr.add_argument("--scores", default=None,
                    help="comma-separated score columns of results.parquet, each optionally "
                         "NAME:higher or NAME:lower (which end is hard), and random (default: "
                         f"{','.join(DEFAULT_SCORES)}; those missing from the run skipped)")
    pr.add_argument("--keep", default=",".join(map(str, DEFAULT_KEEP)),
                    help="fractions of the examples kept, in (0, 1] (default: %(default)s)")
    pr.add_argument("--remove", default="easy,hard",
                    help="which end each score removes: easy, hard, easy,hard or none "
                         "(default: %(default)s)")
    pr.add_argument("--stratified", action="store_true",
                    help="also a coverage-preserving selection: equal draws over --bins "
                         "equal-width bins of the score (CCS-style; docs/prune.md)")
    pr.add_argument("--bins", type=int, default=DEFAULT_BINS,
                    help="--stratified's bins (default: %(default)s)")
    pr.add_argument("--seeds", type=_seeds, default=[0, 1, 2],
                    help="retraining seeds: a count (3 = seeds 0,1,2) or a comma-separated "
                         "list (default: 3)")
    pr.add_argument("--selection-seed", type=int, default=0,
                    help="the seeded draw breaking ties in a score and drawing the random "
                         "baseline (default: %(default)s)")
    pr.add_argument("--epochs", type=int, default=None,
                    help="training epochs of every subset (default: the run's)")
    pr.add_argument("--device", default="cpu",
                    help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    pr.add_argument("--model", default=None, metavar="MODULE:FACTORY",
                    help="a run of your own --model: name it again (as pdepth improve)")
    pr.add_argument("--quiet", action="store_true", help="no progress bars or log lines")


def _score_parser(sub, d) -> None:
    """``pdepth score``'s flags (docs/score.md)."""
    from .protocol.config import MIN_MEMORY_BUDGET

    s = sub.add_parser(
        "score", help="prediction depth of a model trained elsewhere, train and test splits",
        description="Score every example of a dataset's training and test splits with a "
                    "model trained elsewhere: the support set is the training split with its "
                    "labels (training examples scored with their own row excluded, test "
                    "examples against the same support). Writes results.parquet (one row per "
                    "example, split train/test), config.json and report.html. See docs/score.md.")
    s.add_argument("--model", required=True,
                   metavar="timm:NAME|torchvision:NAME|hf:DIR|MODULE:FACTORY",
                   help="timm / torchvision model by name (random weights unless "
                        "--checkpoint; nothing is downloaded), a local save_pretrained folder "
                        "of a Hugging Face image classifier, or your own factory")
    s.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a keyword for the model's builder (repeatable; VALUE a Python "
                        "literal, else a string), e.g. num_classes=10, img_size=32")
    s.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="the model's weights (a state dict, torch.load(weights_only=True))")
    s.add_argument("--dataset", default=d.dataset, metavar="NAME|hf:DIR",
                   help=f"one of {', '.join(DATASETS)} (read as pdepth run reads them), or "
                        "hf:DIR, a datasets.save_to_disk folder with train and test splits "
                        "(default: %(default)s)")
    s.add_argument("--root", default=None, help="dataset folder (as pdepth run's --root)")
    s.add_argument("--image-size", type=int, default=None, metavar="S",
                   help="imagefolder: resize every image to S x S (default: 32)")
    s.add_argument("--image-column", default="image", help="hf:DIR: the image column "
                                                           "(default: %(default)s)")
    s.add_argument("--label-column", default="label", help="hf:DIR: the label column "
                                                           "(default: %(default)s)")
    s.add_argument("--subset", type=_subset, default=None,
                   help="random subset of the training split ('all', the default: every "
                        "example)")
    s.add_argument("--test-subset", type=_subset, default=None,
                   help="random subset of the test split (default: all)")
    s.add_argument("--probes", default=None,
                   help="a probe preset or comma-separated module names in forward order "
                        "(default: auto)")
    s.add_argument("--token", default=None, choices=["cls", "mean", "all"],
                   help="block outputs [B, T, C]: cls, mean or all (default: the preset's)")
    s.add_argument("--metric", default=None, choices=["euclidean", "cosine"],
                   help="the k-NN metric: euclidean (default) or cosine")
    s.add_argument("--k", type=int, default=d.k, help="k-NN neighbours (default: %(default)s)")
    s.add_argument("--reference", default="network",
                   choices=["network", "labels", "last-probe"],
                   help="what depth is measured against: the model's prediction (its head "
                        "must predict the dataset's classes), the labels, or the last probe "
                        "(default: %(default)s)")
    s.add_argument("--max-dim", type=int, default=d.max_dim,
                   help="pool conv maps to at most this many features (0: no pooling; "
                        "default: %(default)s)")
    s.add_argument("--memory-budget", type=float, default=d.memory_budget / 2**20,
                   help="MiB of embeddings the scoring may hold in RAM (the embedding "
                        "store, as pdepth run's); beyond it they go to a temporary folder "
                        "on disk, removed afterwards, read one probe at a time in blocks of "
                        f"this size; at least {MIN_MEMORY_BUDGET // 2**20} "
                        "(default: %(default).0f)")
    s.add_argument("--device", default="cpu",
                   help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    s.add_argument("--batch-size", type=int, default=256,
                   help="forward-pass batch size (default: %(default)s)")
    s.add_argument("--workers", type=int, default=0,
                   help="DataLoader processes decoding imagefolder images (default: 0)")
    s.add_argument("--out", default="runs/pdepth-score",
                   help="output directory (default: %(default)s)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace the pdepth results in --out, deleting only the files pdepth "
                        "wrote (a directory with other files is always refused)")
    s.add_argument("--quiet", action="store_true", help="no progress bars or log lines")


def _err(msg) -> None:
    """Prints ``msg`` as one line (a multi-line message, e.g. from several ranks, joined)."""
    print(f"pdepth: error: {' '.join(str(msg).split())}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .protocol import MissingDependencyError, OutputExistsError

    try:
        if args.command == "improve":
            _check_improve(args)
            return _improve(args, argv)
        if args.command == "score":
            return _score(args)
        if args.command == "prune":
            return _prune(args, argv)
        return _report(args.dir) if args.command == "report" else _run(args)
    except (OutputExistsError, MissingDependencyError, ValueError, OSError) as exc:
        _err(exc)  # errors the user can fix, caught before anything is half-written
        return 2
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


def _check_improve(args) -> None:
    """``improve``'s --epochs (>= 1) and --seeds (in 0..MAX_SEED), before any work."""
    from .protocol.config import check_seeds

    args.seeds = check_seeds(args.seeds)
    if args.epochs is not None and not 1 <= args.epochs < 2**63:
        raise ValueError(f"--epochs must be an integer >= 1, got {args.epochs}")


def _run(args) -> int:
    from .builders import parse_model_args
    from .protocol import OutputExistsError, RunConfig, run

    if not math.isfinite(args.memory_budget):  # int() of it would raise, unnamed
        raise ValueError(f"memory_budget (--memory-budget) must be a finite number of MiB, got "
                         f"{args.memory_budget}")
    probes = args.probes
    if probes is not None and "," in probes:
        probes = [s.strip() for s in probes.split(",") if s.strip()]
    arch = args.arch if args.arch is not None or args.model is not None else RunConfig.arch
    config = RunConfig(
        dataset=args.dataset, root=args.root, arch=arch, probes=probes,
        seeds=args.seeds, epochs=args.epochs, subset=args.subset, k=args.k, lr=args.lr,
        batch_size=args.batch_size, max_dim=args.max_dim or None,
        memory_budget=int(args.memory_budget * 2**20), device=args.device,
        knn_filter=args.knn_filter, metric=args.metric, label_noise=args.label_noise,
        noise_kind=args.noise_kind, noise_matrix=args.noise_matrix,
        image_size=args.image_size, model=args.model, checkpoint=args.checkpoint,
        model_args=parse_model_args(args.model_arg) or None,
        download=args.download, workers=args.workers, keep_cache=args.keep_cache,
        token=args.token, el2n_epoch=args.el2n_epoch)
    group, rank = _distributed(args.device)  # under torchrun: the models spread over ranks
    tag = "" if group is None else f"[rank {rank}] "
    log = None if args.quiet else (lambda msg: print(tag + msg, file=sys.stderr, flush=True))
    try:
        run(config, args.out, overwrite=args.overwrite, progress=not args.quiet and rank == 0,
            log=log, process_group=group)
    except KeyboardInterrupt:
        _err(f"interrupted; the models finished so far are kept in {args.out}/models; rerun "
             "the same command to resume")
        return 130
    except RuntimeError as exc:
        if group is None or isinstance(exc, OutputExistsError):
            raise
        _err(exc)  # a rank failed: every rank reports it
        return 1
    finally:
        if group is not None:
            import torch.distributed as dist

            dist.destroy_process_group()
    if rank == 0 and args.quiet:
        print(args.out)
    return 0


def _score(args) -> int:
    """``pdepth score``: :func:`pdepth.model_score.score_to_folder` (every check before the output
    folder is touched), then the folder's path."""
    from .model_score import ScoreSettings, _finite_mib, score_to_folder

    probes = args.probes
    if probes is not None and "," in probes:
        probes = [p.strip() for p in probes.split(",") if p.strip()]
    settings = ScoreSettings(
        model=args.model, dataset=args.dataset, root=args.root, model_args=args.model_arg,
        checkpoint=args.checkpoint, image_column=args.image_column,
        label_column=args.label_column, subset=args.subset, test_subset=args.test_subset,
        probes=probes, token=args.token, metric=args.metric, k=args.k,
        reference=args.reference, max_dim=args.max_dim or None,
        memory_budget=_finite_mib(args.memory_budget), device=args.device,
        batch_size=args.batch_size, image_size=args.image_size, workers=args.workers)
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = score_to_folder(settings, args.out, overwrite=args.overwrite,
                          progress=not args.quiet, log=log)
    print(out)
    return 0


def _distributed(device: str):
    """Under torchrun (``WORLD_SIZE`` > 1): joins the process group (NCCL for a CUDA
    ``--device``, else gloo; 30 min timeout) and returns ``(group, rank)``; else
    ``(None, 0)``."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None, 0
    import datetime

    import torch
    import torch.distributed as dist

    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo",
                                timeout=datetime.timedelta(minutes=30))
    return dist.group.WORLD, dist.get_rank()


def _report(path: str) -> int:
    """``pdepth report DIR``: the run's figures and report.html drawn again (a ``pdepth
    score`` folder's: :mod:`pdepth.score_report`, by its config.json), under the rules
    of every command that writes into a run folder (:func:`open_for_writing`: pdepth's
    files only, no symbolic links, the folder's lock)."""
    from pathlib import Path

    from .protocol import require_modules
    from .protocol.outdir import open_for_writing
    from .report import REPORT_DEPENDENCIES, write_report
    from .score_report import is_score_folder, write_score_report

    out = Path(path)
    command, needed = "pdepth run", ["results.parquet", "per_model.npz", "data.npz",
                                     "config.json"]
    if is_score_folder(out):  # config.json says `pdepth score`: its own report
        command, needed = "pdepth score", ["results.parquet", "config.json"]
        write_report = write_score_report
    missing = [f for f in needed if not (out / f).exists()]
    if missing or not (out / "COMPLETE").exists():
        raise FileNotFoundError(
            f"{out} holds no finished pdepth run (missing: {', '.join(missing) or 'COMPLETE'});"
            f" run `{command} --out {out}` first")
    require_modules(REPORT_DEPENDENCIES, "pdepth report")
    with open_for_writing(out, "pdepth report"):
        print(write_report(out))
    return 0


def _improve(args, argv) -> int:
    """``pdepth improve DIR``: :func:`pdepth.improve.improve`, the run's report redrawn with
    its results where the run has one, then the path of improve.json (with --quiet: only
    that). Under the rules of every command that writes into a run folder
    (:func:`open_for_writing`), checked before any training, the lock held throughout."""
    import shlex
    from pathlib import Path

    from .improve import IMPROVE_FILE, improve
    from .protocol.outdir import open_for_writing

    words = sys.argv[1:] if argv is None else list(argv)
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    with open_for_writing(args.dir, "pdepth improve"):
        improve(args.dir, epochs=args.epochs, device=args.device, progress=not args.quiet,
                cleanlab=not args.no_cleanlab, seeds=args.seeds, log=log,
                command=shlex.join(["pdepth", *words]), model=args.model)
        if (Path(args.dir) / "report.html").exists():  # show improve.json there too
            from .report import write_report

            write_report(args.dir)
    print(Path(args.dir) / IMPROVE_FILE)
    return 0


def _prune(args, argv) -> int:
    """``pdepth prune DIR``: :func:`pdepth.prune.prune` (every input checked before anything
    is written, the folder's lock held throughout), then the path of prune.json."""
    import shlex
    from pathlib import Path

    from .prune import PRUNE_FILE, parse_modes, prune

    _check_improve(args)  # --epochs, --seeds: as improve's
    modes = parse_modes(args.remove, args.stratified)
    words = sys.argv[1:] if argv is None else list(argv)
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    prune(args.dir, scores=args.scores, keep=args.keep, modes=modes, seeds=args.seeds,
          epochs=args.epochs, device=args.device, model=args.model, bins=args.bins,
          selection_seed=args.selection_seed, progress=not args.quiet, log=log,
          command=shlex.join(["pdepth", *words]))
    print(Path(args.dir) / PRUNE_FILE)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
