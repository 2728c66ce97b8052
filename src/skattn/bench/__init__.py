"""The benchmark harness behind `skattn bench`: seed grid, providers, cold-L2 timing, reports."""
from skattn.bench.floors import Ceilings, cell_bytes, cell_flops, floor_us
from skattn.bench.grid import Cell, select
from skattn.bench.report import report

__all__ = ["Ceilings", "Cell", "cell_bytes", "cell_flops", "floor_us", "report", "select"]
