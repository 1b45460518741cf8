"""What the bench's cells hold on disk, and `keep_models: false`: a fit cell's exported model is removed once every
cell that reads it has finished.

A removed model leaves `model_removed.json` in its cell (the model's size and its stage.json), which counts as the
fit's completion marker, so the cell is not rerun and its logs, curves and the results built from its readers stay.
Should a later run plan a new reader of a removed model (another attack learning rate, a shared cells_dir), the
cell is made again first (`revive`): its config and seeds are the same, so it trains the same model (bitwise on CPU;
on GPUs up to non-deterministic kernels). Models are removed only from cells the bench made (their marker exists);
nothing else in a cell folder, and nothing outside the cells, is touched.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable, Optional

from immunize.bench.cells import MARKERS, REMOVED_MODEL, Cell, read_json
from immunize.bench.rows import NONE, Table
from immunize.io import atomic_write_json


def tree_bytes(path: Path) -> int:
    """Bytes of the regular files under path (0 when it does not exist); links are not followed."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def has_model(cell: Cell, cells_dir: Path) -> bool:
    """The fit cell's exported model is on disk (its stage.json marker exists)."""
    return (cell.directory(cells_dir) / MARKERS["fit"]).is_file()


def removed_record(cell: Cell, cells_dir: Path) -> Optional[dict]:
    """What remove_model recorded for a cell whose model it removed (None: not removed)."""
    return read_json(cell.directory(cells_dir) / REMOVED_MODEL)


def remove_model(cell: Cell, cells_dir: Path) -> int:
    """Remove a finished fit cell's exported model, recording its size first; returns the bytes freed (0 when the
    cell has no finished model)."""
    if cell.kind != "fit" or not has_model(cell, cells_dir):
        return 0
    d = cell.directory(cells_dir)
    model = d / "model"
    size = tree_bytes(model)
    stage = read_json(d / MARKERS["fit"]) or {}
    atomic_write_json(d / REMOVED_MODEL, {"model_bytes": size, "stage": stage})  # before: the cell stays finished
    shutil.rmtree(model)
    return size


class ModelPruner:
    """Tracks which cells read each fit cell's model and removes a model once all its readers have finished.

    Args:
        cells_dir: the bench's cells folder.
        enabled: remove models at all (the bench's `keep_models: false`); when off, only `revive` acts.
    """

    def __init__(self, cells_dir: Path, enabled: bool):
        self.cells_dir = Path(cells_dir)
        self.enabled = enabled
        self.readers: dict[str, list[Cell]] = {}
        self.fits: dict[str, Cell] = {}
        self.freed = 0

    def add(self, cells: Iterable[Cell]) -> None:
        """Register cells (a plan's, or search trials as the study makes them)."""
        for cell in cells:
            if cell.kind == "fit":
                self.fits.setdefault(cell.name, cell)
            source = cell.fit_input
            if source is not None:
                self.fits.setdefault(source.name, source)
                readers = self.readers.setdefault(source.name, [])
                if all(r.name != cell.name for r in readers):
                    readers.append(cell)

    def revive(self, cells: list[Cell]) -> list[Cell]:
        """The cells to run, with every removed model that an unfinished cell reads made again first (upstream first,
        whole chains: a removed defense model whose aligned model was removed too needs both)."""
        self.add(cells)
        again: list[Cell] = []
        for cell in cells:
            if cell.is_done(self.cells_dir):
                continue
            chain, source = [], cell.fit_input
            while source is not None and not has_model(source, self.cells_dir) \
                    and removed_record(source, self.cells_dir) is not None:
                chain.append(source)
                source = source.fit_input
            for source in reversed(chain):
                if all(c.name != source.name for c in again):
                    (source.directory(self.cells_dir) / REMOVED_MODEL).unlink()
                    again.append(source)
        names = {c.name for c in cells}
        return [c for c in again if c.name not in names] + list(cells)

    def after(self, cell: Cell) -> int:
        """Called when a cell has finished (or was found finished): remove its input's model if every reader of it
        has finished; returns the bytes freed."""
        source = cell.fit_input
        return self._try(source) if source is not None else 0

    def sweep(self) -> int:
        """Remove every registered model whose readers have all finished; returns the bytes freed."""
        return sum(self._try(cell) for cell in list(self.fits.values()))

    def _try(self, source: Cell) -> int:
        readers = self.readers.get(source.name, [])
        if not self.enabled or not readers or not all(r.is_done(self.cells_dir) for r in readers):
            return 0
        freed = remove_model(source, self.cells_dir)
        self.freed += freed
        return freed


def disk_usage(cells: list[Cell], cells_dir: Path) -> dict:
    """results.json's "disk": bytes each cell's folder holds now and, for fits, the size of its exported model
    (measured, or as recorded when it was removed), with totals."""
    rows = []
    for cell in cells:
        d = cell.directory(cells_dir)
        if not d.is_dir():
            continue
        row = {"cell": cell.name, "label": cell.label, "stage": cell.stage, "kind": cell.kind, "bytes": tree_bytes(d)}
        if cell.kind == "fit":
            record = removed_record(cell, cells_dir)
            row["model_bytes"] = record.get("model_bytes") if record else tree_bytes(d / "model")
            row["model_removed"] = record is not None and not has_model(cell, cells_dir)
        rows.append(row)
    fits = [r for r in rows if r["kind"] == "fit"]
    return {"cells": rows, "total_bytes": sum(r["bytes"] for r in rows),
            "models_written_bytes": sum(r["model_bytes"] or 0 for r in fits),
            "models_removed": sum(r["model_removed"] for r in fits)}


def by_stage(disk: dict) -> list[dict]:
    """The disk rows summed per stage (the report's table), in the order stages first appear."""
    out: dict[str, dict] = {}
    for row in disk.get("cells", []):
        s = out.setdefault(row["stage"], {"stage": row["stage"], "cells": 0, "bytes": 0, "model_bytes": 0,
                                          "models_removed": 0, "fits": 0})
        s["cells"] += 1
        s["bytes"] += row["bytes"]
        if row["kind"] == "fit":
            s["fits"] += 1
            s["model_bytes"] += row.get("model_bytes") or 0
            s["models_removed"] += int(bool(row.get("model_removed")))
    return list(out.values())


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f}"


def disk_table(disk: dict) -> Table:
    """Disk per stage: its cells, the bytes their folders hold now, the size of one exported model and how many of
    them keep_models: false removed."""
    table = Table("disk", "Disk per cell",
                  "Per stage: the cells' folders now (models, generations, logs) and one exported model's size (mean "
                  "over the stage's fits; measured when it was written). keep_models: false removes a model once "
                  f"every cell reading it has finished: {disk['models_removed']} removed here, "
                  f"{_mb(disk['models_written_bytes'])} MB of models written, {_mb(disk['total_bytes'])} MB on disk "
                  "now. Per cell: results.json's disk.cells.",
                  ["stage", "cells", "MB now (all cells)", "MB now per cell", "MB per model", "models removed"])
    for s in by_stage(disk):
        per_model = _mb(s["model_bytes"] / s["fits"]) if s["fits"] else NONE
        table.rows.append([s["stage"], s["cells"], _mb(s["bytes"]), _mb(s["bytes"] / s["cells"]), per_model,
                           s["models_removed"] if s["fits"] else NONE])
    return table
