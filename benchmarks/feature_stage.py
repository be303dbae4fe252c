"""The features stage as a user runs it (`medfocus features`, mode none) against a bare ``encode_image`` loop.

Three measurements, each in its own fresh process (so that peak memory is that process's own):

1. Throughput, side by side: the stage (read each image, steer, preprocess, encode, write the Zarr store) and a bare
   loop over the same images at the same batch size (PIL decode + open_clip's own preprocess + ``encode_image``),
   alternating stage, bare, stage, bare. The stage's seconds are those of its work loop (from ``features.json``);
   the bare loop's likewise exclude building the model. Both run with the same torch thread count.
2. Peak memory (max RSS of the process) of the stage on N and 10 x N generated demo images: streaming means it
   should not grow with N.
3. Bytes per image of the feature store on disk (compressed Zarr, the stored dtype recorded).

Models are random-init (``pretrained: none``): timings do not depend on the weights, and none can be downloaded here.

    nice -n 5 .venv/bin/python benchmarks/feature_stage.py --models ViT-B-32 ViT-B-16 --threads 2 \\
        --out benchmarks/results/feature_stage.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
MEDFOCUS = [str(Path(sys.executable).with_name("medfocus"))]  # the console script beside this interpreter


def run_measured(command: list[str], env: dict) -> tuple[float, int]:
    """Run ``command``; its wall seconds and its own peak RSS in bytes (Linux ru_maxrss is in KiB)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    stderr = process.stderr.read().decode(errors="replace")
    process.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{stderr[-3000:]}")
    return time.perf_counter() - started, usage.ru_maxrss * 1024


def write_params(folder: Path, model: str, batch_size: int, demo_images_per_class: int = 2) -> Path:
    params = {
        "prepare": {"demo_images_per_class": demo_images_per_class, "fractions": [1.0], "shots": [1], "subset_seeds": [0]},
        "features": {"model": model, "pretrained": "none", "modes": ["none"], "batch_size": batch_size,
                     "scheduler": "synchronous", "workers": 1, "dtype": "float16"},
    }
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def stage(dataset: str, root: Path, params: Path, cache: Path, env: dict) -> dict:
    """One fresh `medfocus features` run; its summary with the process's wall seconds, peak RSS and store bytes."""
    shutil.rmtree(cache, ignore_errors=True)
    common = ["-d", dataset, "--root", str(root), "--params", str(params), "--cache-dir", str(cache), "-q"]
    subprocess.run([*MEDFOCUS, "prepare", *common], env=env, check=True, stdout=subprocess.DEVNULL)
    wall, peak = run_measured([*MEDFOCUS, "features", *common], env)
    summary = json.loads((cache / dataset / "features.json").read_text())
    entry = summary["modes"]["none"]
    store = Path(entry["store"].removeprefix("file://"))
    store_bytes = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    return {"images": entry["processed"], "seconds": entry["seconds"], "process_wall_s": wall, "peak_rss_bytes": peak,
            "store_bytes": store_bytes, "weights_source": summary["weights_source"], "dtype": entry["dtype"]}


def bare_loop(model: str, batch_size: int, image_list: Path) -> None:
    """(child process) open_clip's own preprocess + encode_image over the listed images; prints its timings."""
    import open_clip
    import torch
    from PIL import Image

    paths = [line for line in image_list.read_text().splitlines() if line]
    net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=None)
    net.eval()
    encode_seconds = 0.0
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(paths), batch_size):
            batch = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths[start : start + batch_size]])
            encode_started = time.perf_counter()
            net.encode_image(batch)
            encode_seconds += time.perf_counter() - encode_started
    print(json.dumps({"images": len(paths), "seconds": time.perf_counter() - started, "encode_seconds": encode_seconds,
                      "threads": torch.get_num_threads()}))


def bare(model: str, batch_size: int, image_list: Path, env: dict) -> dict:
    command = [sys.executable, __file__, "--bare-loop", model, str(batch_size), str(image_list)]
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    output = process.stdout.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"bare loop failed:\n{process.stderr.read().decode()[-3000:]}")
    return json.loads(output.strip().splitlines()[-1]) | {"process_wall_s": time.perf_counter() - started,
                                                            "peak_rss_bytes": usage.ru_maxrss * 1024}


def real_subset(count: int, folder: Path) -> tuple[Path, list[str]]:
    """A path,label CSV of ``count`` COVID training images (sorted names, classes taken in turn), and their paths."""
    by_class = [sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
                for folder in sorted((SHARED / "covid" / "train").iterdir()) if folder.is_dir()]
    interleaved = [paths[i] for i in range(max(map(len, by_class))) for paths in by_class if i < len(paths)]
    chosen = interleaved[:count]
    path = folder / f"covid_{len(chosen)}.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows((str(p), p.parent.name) for p in chosen)
    return path, [str(p) for p in chosen]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-B-16"])
    parser.add_argument("--images", type=int, nargs="+", default=[240, 60],
                        help="real COVID images for the throughput runs, one count per model")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-sizes", type=int, nargs=2, default=[100, 1000], metavar=("SMALL", "LARGE"))
    parser.add_argument("--out", type=Path, default=Path("feature_stage.json"))
    args = parser.parse_args(argv)

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "threads": args.threads,
              "batch_size": args.batch_size, "throughput": [], "memory": []}
    with tempfile.TemporaryDirectory(prefix="feature_stage_") as scratch:
        scratch = Path(scratch)
        for model, count in zip(args.models, args.images):
            csv_path, paths = real_subset(count, scratch)
            image_list = scratch / "images.txt"
            image_list.write_text("\n".join(paths))
            params = write_params(scratch, model, args.batch_size)
            for repeat in range(args.repeats):
                staged = stage("covid", csv_path, params, scratch / "cache", env)
                plain = bare(model, args.batch_size, image_list, env)
                row = {"model": model, "repeat": repeat, "stage": staged, "bare": plain,
                       "stage_images_per_s": staged["images"] / staged["seconds"],
                       "bare_images_per_s": plain["images"] / plain["seconds"],
                       "bare_encode_only_images_per_s": plain["images"] / plain["encode_seconds"]}
                row["ratio"] = row["stage_images_per_s"] / row["bare_images_per_s"]
                row["ratio_vs_encode_only"] = row["stage_images_per_s"] / row["bare_encode_only_images_per_s"]
                report["throughput"].append(row)
                print(f"{model} #{repeat}: stage {row['stage_images_per_s']:.2f} img/s, bare {row['bare_images_per_s']:.2f} "
                      f"img/s (encode only {row['bare_encode_only_images_per_s']:.2f}), ratio {row['ratio']:.2f}, "
                      f"store {staged['store_bytes'] / staged['images']:.0f} B/image", flush=True)
        for total in args.memory_sizes:
            root = scratch / f"demo_{total}"
            per_class = -(-total // 3)  # three demo classes
            params = write_params(scratch, args.models[0], args.batch_size, demo_images_per_class=per_class)
            from medfocus.pipeline.demo import generate_demo

            generate_demo(root, images_per_class=per_class)
            staged = stage("demo", root, params, scratch / "cache", env)
            report["memory"].append({"model": args.models[0], "images": staged["images"], **staged})
            print(f"memory, {staged['images']} images: peak RSS {staged['peak_rss_bytes'] / 2**20:.0f} MiB, "
                  f"{staged['images'] / staged['seconds']:.2f} img/s, store {staged['store_bytes'] / staged['images']:.0f} "
                  "B/image", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--bare-loop":
        bare_loop(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
    else:
        raise SystemExit(main())
