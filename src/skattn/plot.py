"""Pictures of plans: programs against the work list."""
from __future__ import annotations


def draw_plan(plan, path) -> None:
    """PNG of `plan`: one row per program, its work items as bars coloured by tile."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranges = plan.ranges()
    split = plan.pieces()
    cmap = plt.get_cmap("tab20")
    height = min(12.0, 2.0 + 0.04 * len(ranges))
    fig, ax = plt.subplots(figsize=(11, height))
    for p, (start, stop) in enumerate(ranges):
        item = start
        while item < stop:
            tile = plan.tile_of(item)
            end = min(stop, plan.tile_range(tile)[1])
            ax.barh(p, end - item, left=item, height=0.8, color=cmap(tile % 20),
                    hatch="///" if tile in split else None, edgecolor="black" if tile in split else None,
                    linewidth=0.3)
            item = end
    ax.invert_yaxis()
    ax.set_xlabel(f"work item (tile x KV block), W = {plan.work}")
    ax.set_ylabel(f"program (programs = {plan.programs})")
    ax.set_title(f"{plan.policy}: {plan.ntiles_dst} tiles x {plan.ntiles_kv} KV blocks, fixup "
                 f"{plan.fixup}; hatched = split tiles ({len(split)})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
