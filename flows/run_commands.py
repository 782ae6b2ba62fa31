"""The commands on the finished runs under a root: `ls`, `report`, `sample`, `reconstruct`
and `verify`. Each imports what it needs when it runs: `vqvae2 --help` stays instant."""
from __future__ import annotations

import argparse
import datetime
import json
from typing import Any

from .command_config import build_config, finished_run


def _write(path: str | None, default: str, png: bytes) -> None:
    """Write `png` to `path`, or without one to `default` in the current folder; say where."""
    import os

    from storage.fsutil import redact, write_bytes

    write_bytes(path or default, png)
    print(f"wrote {redact(path) if path else os.path.abspath(default)}")


def print_metrics(metrics: dict[str, Any]) -> None:
    from tasks.machinery.rounding import rounded

    for name, value in metrics.items():
        print(f"  {name:32s} {rounded(value)}")


def cmd_sample(args: argparse.Namespace) -> None:
    finished = finished_run(args)  # before the imports below, which take seconds
    import torch
    from tqdm import tqdm

    from tasks.config import validate_config
    from tasks.machinery.devices import resolve_device
    from tasks.machinery.models import load_model
    from tasks.machinery.reporting import image_grid, png_bytes
    from tasks.stages import INGEST, TRAIN_AUTOENCODER, TRAIN_PRIORS
    from tasks.stages.sample import SampleSettings, draw_batch

    # The sample stage's settings with this command's flags, no rejection: the same flags
    # and seed draw the same images as the stage would.
    given = {"num_samples": args.n, "classes": [args.class_] if args.class_ is not None else None,
             "acceptance_rates": [1.0], "temperature": args.temperature, "top_k": args.top_k, "seed": args.seed,
             "batch_size": args.batch_size}
    config = validate_config(finished.config.model_dump() | {"sample": finished.config.sample.model_dump() | given})
    settings, dataset = SampleSettings.of(config), finished.get(INGEST)
    plan = settings.plan(dataset)  # the class named as everywhere: `7`, `sneaker` or `Sneaker`
    options, device = finished.runtime.storage_options, resolve_device(config.training.device)
    autoencoder = load_model(finished.get(TRAIN_AUTOENCODER), options, device)
    priors = [load_model(p, options, device) for p in finished.every(TRAIN_PRIORS)]
    images, labels = [], []
    with tqdm(total=args.n, desc="sampling", unit="image") as bar:
        for index, first in enumerate(range(0, args.n, args.batch_size)):
            batch, _, drawn = draw_batch(settings, plan, index, min(args.batch_size, args.n - first), autoencoder, priors)
            images.append(batch.cpu())
            labels += drawn.tolist()
            bar.update(len(batch))
    said, name = drawn_classes(labels, dataset.class_names, list(plan.classes), args.class_ is not None)
    print(said)
    _write(args.out, f"sample-{name}{len(labels)}.png", png_bytes(image_grid(torch.cat(images)), scale=args.scale))


def drawn_classes(labels: list[int], class_names: list[str], chosen: list[int], named: bool,
                  limit: int = 30) -> tuple[str, str]:
    """What a sampling drew, in words, from the labels it drew with (-1: none, unconditional):
    `16 images, 10 classes in turn: 2 each of T-shirt/top, ...; 1 each of Shirt, ...`; and the
    start of a file name for it (`sneaker-`, `every-class-`, `4-classes-`, or nothing)."""
    import re
    from collections import Counter

    count = Counter(labels)
    if not chosen or -1 in count:
        return f"{len(labels)} images, unconditional (the priors take no class)", ""
    if named:
        name = class_names[chosen[0]]
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or f"class-{chosen[0]}"
        return f"{len(labels)} images of class {name}", f"{slug}-"
    groups: list[tuple[int, list[str]]] = []  # runs of classes drawn equally often, in the order drawn
    for index in chosen:
        if count[index]:
            if groups and groups[-1][0] == count[index]:
                groups[-1][1].append(class_names[index])
            else:
                groups.append((count[index], [class_names[index]]))
    listed, shown = [], 0
    for times, names in groups:
        kept = names[:max(limit - shown, 0)]
        shown += len(kept)
        each = "each " if len(names) > 1 else ""
        more = f" and {len(names) - len(kept)} more" if kept and len(kept) < len(names) else ""
        listed.append(f"{times} {each}of {', '.join(kept)}{more}" if kept else f"{times} {each}of {len(names)} more")
    drew = sum(1 for index in chosen if count[index])
    said = f"{len(labels)} images, {drew} classes in turn: {'; '.join(listed)}"
    if drew < len(chosen):
        said += f"; none of the other {len(chosen) - drew} (-n {len(chosen)} draws every class)"
        return said, f"{drew}-classes-"
    return said, "every-class-"


def cmd_reconstruct(args: argparse.Namespace) -> None:
    finished = finished_run(args)
    import numpy as np
    import torch

    from storage.fsutil import read_bytes
    from storage.imaging import decode_image, prepare
    from tasks.machinery.models import load_model, reconstruct
    from tasks.machinery.reporting import pairs_grid, png_bytes
    from tasks.stages import INGEST, TRAIN_AUTOENCODER

    config = finished.config
    model = load_model(finished.get(TRAIN_AUTOENCODER), finished.runtime.storage_options)
    if args.images:
        mode = "L" if config.model.image_channels == 1 else "RGB"
        arrays = [decode_image(prepare(read_bytes(path), config.model.image_size, mode)[0]) for path in args.images]
        images = torch.from_numpy(np.stack([a.reshape(a.shape[0], a.shape[1], -1) for a in arrays])).permute(0, 3, 1, 2)
        images = images.float() / 255
    else:
        images, _ = finished.get(INGEST).first_images("test", args.count, finished.runtime.storage_options)
    recon = reconstruct(model, images)
    mse = torch.nn.functional.mse_loss(recon, images).item()
    print(f"{len(images)} images, reconstruction MSE {mse:.4g}")
    _write(args.out, f"reconstructions-{len(images)}.png", png_bytes(pairs_grid(images, recon, 2 * len(images)),
                                                                     scale=args.scale))


def cmd_report(args: argparse.Namespace) -> None:
    from tasks.runs import RecordedRun

    finished = finished_run(args)
    if isinstance(finished, RecordedRun):  # report.json as the record names it: no stage code to import
        report, markdown, key = finished.report_data(), finished.record.markdown, finished.record.key
    else:
        from tasks.stages import EVALUATE, evaluate

        manifest = finished.get(EVALUATE)
        report = evaluate.read_report(manifest, finished.runtime.storage_options).model_dump(mode="json")
        markdown, key = manifest.markdown, manifest.key
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"report of the {report['preset']} run {key} on dataset {report['dataset'].get('key')}: {markdown}")
    print_metrics(report["metrics"])
    for row in report["training"]:
        print(f"  trained {row.get('stage', '?'):20s} {row.get('steps', '?')} steps")


def cmd_ls(args: argparse.Namespace) -> None:
    from storage.fsutil import redact
    from tasks.config import Runtime
    from tasks.runs import check_root, finished_runs

    runtime = Runtime.of(build_config(args))
    check_root(runtime.root, runtime.storage_options)  # a root not there is not an empty one
    runs = finished_runs(runtime.root, runtime.storage_options)
    rows = [{"key": run.record.key, "preset": run.record.preset, "source": run.record.source,
             "finished": run.finished.isoformat(timespec="seconds") if run.finished else None,
             "sample_fid": run.record.sample_fid, "report": redact(run.record.markdown),
             "report_json": redact(run.record.report), "num_classes": run.record.num_classes}
            for run in runs]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        where = redact(runtime.root)
        print(f"no finished runs under {where}: `vqvae2 run --root {where}` makes one")
        return
    header = ("KEY", "PRESET", "SOURCE", "FINISHED", "SAMPLE FID", "REPORT")
    cells = [header] + [(r["key"], r["preset"], r["source"], _local_time(run.finished), _number(r["sample_fid"]),
                         r["report"]) for r, run in zip(rows, runs)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header) - 1)]
    for row in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])


def _local_time(when: datetime.datetime | None) -> str:
    return when.astimezone().strftime("%Y-%m-%d %H:%M") if when else "-"


def _number(value: float | None) -> str:
    from tasks.machinery.rounding import rounded

    return rounded(value) if value is not None else "-"


def cmd_verify(args: argparse.Namespace) -> None:
    from storage.fsutil import redact
    from tasks.config import Runtime
    from tasks.runs import check_root
    from tasks.verify import repair, verify_root

    runtime = Runtime.of(build_config(args))
    root = redact(runtime.root)
    check_root(runtime.root, runtime.storage_options)
    checked = verify_root(runtime.root, runtime.storage_options)
    if not checked:
        print(f"no finished artifacts under {root}: nothing to check")
        return
    print(f"checked {_counted(len(checked), 'finished artifact')} ({_counted(sum(c.files for c in checked), 'file')}) "
          f"under {root}")
    unrecorded = [c.artifact for c in checked if not c.recorded]
    if unrecorded:
        print(f"  not checked: {len(unrecorded)} made before vqvae2 recorded their files' digests: "
              + ", ".join(f"{a.directory}/{a.key}" for a in unrecorded))
    damaged = [(c.artifact, d) for c in checked for d in c.damaged]
    for artifact, problem in damaged:
        print(f"  damaged: {redact(artifact.path(problem.path))}: {problem.what}")
    if not damaged:
        print("nothing is damaged")
        return
    them = "it" if len(damaged) == 1 else "them"
    if not args.repair:
        print(f"{_counted(len(damaged), 'damaged file')}: `vqvae2 verify --root {root} --repair` drops {them}, and the "
              f"next run of the config that made {them} makes {them} again")
        raise SystemExit(1)
    done = repair(checked)
    artifacts = ", ".join(sorted({f"{a.directory}/{a.key}" for a, _ in damaged}))
    print(f"repaired {artifacts}: {_dropped(len(done.dropped), len(done.missing))}; the next run of the config that "
          f"made {them} makes {them} again (the rest is reused)")


def _counted(number: int, noun: str) -> str:
    """`1 file`, `3 files`."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _dropped(dropped: int, missing: int) -> str:
    """What repairing did to the damaged files listed: dropped them, or found them missing already."""
    were = "was" if missing == 1 else "were"
    if not missing:
        return f"dropped {_counted(dropped, 'damaged file')}"
    if not dropped:
        return f"{_counted(missing, 'damaged file')} {were} missing already"
    return f"dropped {_counted(dropped, 'damaged file')}, and {missing} {were} missing already"
