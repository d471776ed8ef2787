"""Predict the classes of new images with a trained run.

  python -m experiments.predict --run RUN_DIR --images PATH --out preds.csv
  python -m experiments.predict --run runs/cifar10/lccnn --images ../shared/data/cifar10-jpeg-blind-test.tar.gz \\
      --out preds.csv --step 3510 --bad_images=skip

PATH is a folder or a .tar / .tar.gz / .zip of images (any nesting).  ``preds.csv`` has one row per
image: ``id`` (the file name without extension), ``label`` (the class index, classes in the run's
order: the sorted class-folder names), ``class`` and the softmax probability of each class
(``p_<class>``).  The run's own preprocessing is applied (lateral_jax.training.predict); the
newest readable checkpoint is used unless ``--step`` names one.  Bad input exits 2 with one line
naming the file and the fix.
"""

from __future__ import annotations

import argparse
import sys

from lateral_jax.training.rundir import EXIT_REFUSED


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="the run folder (config.json and checkpoints/)")
    p.add_argument("--images", required=True, help="a folder or .tar/.tar.gz/.zip of images")
    p.add_argument("--out", required=True, help="the CSV to write")
    p.add_argument("--step", type=int, default=None, help="the checkpoint step (default: the newest readable one)")
    p.add_argument("--batch_size", type=int, default=256, help="images per batch (split over every device)")
    p.add_argument(
        "--bad_images", choices=("error", "skip"), default="error", help="skip images that cannot be decoded"
    )
    p.add_argument(
        "--channels",
        choices=("error", "convert"),
        default="error",
        help="'convert': convert images with another channel count than the run's instead of refusing them",
    )
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="a traceback with errors")
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    from lateral_jax.training import predict, programs

    programs.enable_compilation_cache()
    programs.quiet_libraries(args.verbose)

    try:
        result = predict.predict(
            args.run,
            args.images,
            step=args.step,
            batch_size=args.batch_size,
            bad_images=args.bad_images,
            channels=args.channels,
            progress=not args.no_progress,
        )
        result.write_csv(args.out)
    except (OSError, ValueError) as e:  # missing files, bad images, bad arguments: one line, exit 2
        if args.verbose:
            raise
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr, flush=True)
        sys.exit(EXIT_REFUSED)
    skipped = f"; skipped {len(result.skipped)} that cannot be decoded: {', '.join(result.skipped[:5])}" * bool(
        result.skipped
    )
    print(f"{len(result.ids)} images, checkpoint step {result.step} -> {args.out}{skipped}", flush=True)


if __name__ == "__main__":
    main()
