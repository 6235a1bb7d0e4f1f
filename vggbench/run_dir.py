"""A run directory: what it holds, and the order in which it is written.

    checkpoints/epoch-NNNN.pt   the whole training state after epoch N (the newest
                                --keep-checkpoints of them), including the best epoch's weights
    checkpoints/best.pt         the best-validation weights: a copy of those the newest epoch
                                checkpoint names
    config.json, metrics.jsonl, summary.csv, gradflow.json, landscape.json (with --landscape-every)
                                derived from the newest epoch checkpoint
    test.json                   the test result of best.pt, once the run has finished

The newest epoch checkpoint is the truth and every other file is derived from it. At the
end of an epoch, with SIGINT/SIGTERM/SIGUSR1 held through the whole sequence, `write_epoch`
writes (1) epoch-N.pt, (2) best.pt when epoch N is the best so far, (3) the derived files,
then (4) prunes old epoch checkpoints. Every file is replaced atomically, so a kill at any
moment leaves a complete newest epoch checkpoint; files that lag behind it (a missing,
torn or older best.pt, older metrics) are rewritten from it by `restore` before a resumed
run trains. A run writes nothing before its first epoch checkpoint, so a directory that
holds results but no epoch checkpoint is someone else's: a fresh run refuses it, as it
refuses one holding a run's checkpoints.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import torch

from vggbench.checkpoint import (
    BEST_KEYS,
    TMP_SUFFIX,
    CheckpointError,
    WriteError,
    atomic_write_json,
    atomic_write_text,
    check_writable_dir,
    epoch_checkpoints,
    interrupts_deferred,
    load_checkpoint,
    newest_checkpoint,
    save_checkpoint,
)
from vggbench.config import ConfigError

METRIC_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "epoch_time_s", "images_per_s",
                  "dataset")
RUN_FACTS = ("label", "num_params", "torch", "resolved_device")  # what config.json adds to the config
CONFIG, METRICS, SUMMARY, GRADFLOW, TEST = "config.json", "metrics.jsonl", "summary.csv", "gradflow.json", "test.json"
LANDSCAPE = "landscape.json"  # only when the run probes its loss landscape (--landscape-every)
# A run's results, including the plots vggbench.plot writes beside them: a fresh run never overwrites these
RESULT_FILES = (CONFIG, METRICS, SUMMARY, GRADFLOW, TEST, LANDSCAPE, "gradflow.png", "curves.png", "landscape.png")


class RunDir:
    """The files of one run directory (see the module docstring for the layout and the order of writes)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.best = self.checkpoints / "best.pt"

    # --- checks before a run starts ------------------------------------------------------
    def check_writable(self) -> None:
        """Create the directory if needed and prove a file can be written in it; ConfigError if not."""
        if self.checkpoints.exists() and not self.checkpoints.is_dir():
            raise ConfigError(f"{self.checkpoints} is a file, not a directory: choose another --out-dir")
        try:
            check_writable_dir(self.path, "--out-dir")
        except WriteError as err:
            raise ConfigError(str(err)) from None

    def check_fresh(self) -> None:
        """Refuse to start a new run over a run's checkpoints or results (ConfigError naming them)."""
        if epoch_checkpoints(self.checkpoints):
            raise ConfigError(f"{self.path} already holds a run's checkpoints: continue it with --resume, "
                              "or choose another --out-dir")
        found = [name for name in RESULT_FILES if (self.path / name).exists()]
        if self.checkpoints.is_dir():
            found += [f"checkpoints/{p.name}" for p in sorted(self.checkpoints.iterdir()) if not _temporary(p)]
        if found:
            raise ConfigError(f"{self.path} holds results ({', '.join(found)}) but no epoch checkpoint to continue "
                              "from: a new run would overwrite them. Choose another --out-dir, or move them away")

    def resume_checkpoint(self, resume: str) -> Path:
        """The checkpoint `--resume` names: "latest" or this run's directory (the newest epoch
        checkpoint), or a checkpoint file of this run."""
        if resume == "latest":
            return newest_checkpoint(self.checkpoints)
        path = Path(resume)
        if path.is_dir():  # a run directory: this run's means its newest checkpoint
            if path.resolve() in (self.path.resolve(), self.checkpoints.resolve()):
                return newest_checkpoint(self.checkpoints)
            raise ConfigError(f"--resume {path} is a directory, not a checkpoint file: continue the run in it "
                              f"with --out-dir {path} --resume")
        if path.is_file() and path.resolve().parent != self.checkpoints.resolve():
            raise ConfigError(f"--resume {path} is not a checkpoint of the run in {self.path} (its checkpoints are "
                              f"in {self.checkpoints}): continue that run with --out-dir {path.parent.parent} "
                              "--resume, or start a new run")
        return path

    # --- writes ------------------------------------------------------------------------
    def remove_temporaries(self) -> list[Path]:
        """Delete what killed atomic writes left behind (.<name>.<random>.tmp); return their paths."""
        stale = [p for d in (self.path, self.checkpoints) if d.is_dir() for p in d.iterdir() if _temporary(p)]
        for path in stale:
            path.unlink(missing_ok=True)
        return stale

    def write_epoch(self, state: dict, config: dict, dataset: str, keep: int) -> None:
        """Everything the end of epoch `state["epoch"]` changes, in the order that keeps the directory consistent."""
        with interrupts_deferred():
            save_checkpoint(state, self.checkpoints / f"epoch-{state['epoch']:04d}.pt")
            if state["history"]["best"]["epoch"] == state["epoch"]:
                self._write_best(state)
            self.write_derived(state, config, dataset)
            if keep:
                for old in epoch_checkpoints(self.checkpoints)[:-keep]:
                    old.unlink()

    def write_derived(self, state: dict, config: dict, dataset: str) -> None:
        """config.json, metrics.jsonl, summary.csv, gradflow.json (and landscape.json) from an epoch
        checkpoint's `state`."""
        rows = state["history"]["metrics"]
        atomic_write_json(self.path / CONFIG, config)
        atomic_write_text(self.path / METRICS, "".join(json.dumps(row) + "\n" for row in rows))
        table = io.StringIO()
        writer = csv.DictWriter(table, fieldnames=METRIC_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path / SUMMARY, table.getvalue())
        atomic_write_json(self.path / GRADFLOW, {"dataset": dataset, **state["history"]["gradflow"]})
        landscape = state["history"].get("landscape") or {}
        if landscape.get("every") or landscape.get("epochs"):
            atomic_write_json(self.path / LANDSCAPE, {"dataset": dataset, **landscape})

    def restore(self, state: dict, config: dict, dataset: str, epochs: int) -> list[str]:
        """Make the directory agree with the epoch checkpoint `state` a run resumes from; return notes for the user.

        Removes stale temporaries, repairs best.pt from the checkpoint when it is missing,
        torn or holds other weights, rewrites the derived files, and removes test.json while
        epochs remain (it will describe the finished run).
        """
        notes = [f"removed {p.name}, left by an interrupted write" for p in self.remove_temporaries()]
        with interrupts_deferred():
            problem = self._best_problem(state)
            if problem:
                self._write_best(state)
                notes.append(f"{self.best} {problem}: rewritten from the epoch-{state['epoch']:04d} checkpoint "
                             f"(best epoch {state['history']['best']['epoch']})")
            self.write_derived(state, config, dataset)
            if state["epoch"] < epochs:
                (self.path / TEST).unlink(missing_ok=True)
        return notes

    def write_test(self, result: dict) -> None:
        """test.json: the test result of best.pt (the run has finished)."""
        atomic_write_json(self.path / TEST, result)

    def _write_best(self, state: dict) -> None:
        best = state["history"]["best"]
        save_checkpoint({"epoch": best["epoch"], "val_acc": best["val_acc"], "config": state["config"],
                         "model": state["best_model"]}, self.best)

    def _best_problem(self, state: dict) -> str | None:
        """What is wrong with best.pt given the epoch checkpoint `state` (None: it agrees)."""
        if not self.best.exists():
            return "is missing"
        try:
            best = load_checkpoint(self.best, BEST_KEYS)
        except CheckpointError:
            return "is torn or unreadable"
        expected = state["history"]["best"]
        if best["epoch"] != expected["epoch"]:
            return f"holds epoch {best['epoch']}"
        weights = state["best_model"]
        same = best["model"].keys() == weights.keys() and all(torch.equal(best["model"][k], v)
                                                               for k, v in weights.items())
        return None if same else "holds other weights"


def _temporary(path: Path) -> bool:
    """Whether `path` is a temporary of an atomic write (.<name>.<random>.tmp)."""
    return path.name.startswith(".") and path.name.endswith(TMP_SUFFIX) and path.is_file()


def newest_epoch(run_dir: str | Path) -> Path | None:
    """The newest epoch checkpoint of a run directory, if any (for messages after a failure)."""
    found = epoch_checkpoints(Path(run_dir) / "checkpoints")
    return found[-1] if found else None

