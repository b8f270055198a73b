"""What an emulator's manifest says, read without loading the emulator: a summary for people,
and the model owner's check that an emulator gives nothing away before it is sent."""

from __future__ import annotations

import numpy as np

from .errors import IntegrityError


def manifest_summary(m: dict) -> str:
    """Human-readable summary of an emulator manifest."""
    ratio = m["num_params"] / m["source_num_params"]
    lines = [
        f"emulator of {m['source_model']} ({m['architecture']}, {m['num_layers']} blocks), strategy {m['strategy']}",
        f"  N_a={len(m['adapter_layers'])} alpha={m['alpha']} rank_keep_ratio={m['rank_keep_ratio']}",
        f"  adapter blocks    : {m['adapter_layers']}",
        f"  kept middle blocks: {m['kept_layers']}",
        f"  compressed (SRC)  : {m['compressed_layers']}",
        f"  replaced          : {m['replaced_layers']} (harmonizers: {m['harmonizer_layers']})",
        f"  parameters        : {m['num_params']:,} of {m['source_num_params']:,} ({ratio:.1%})",
    ]
    if m.get("shared_layers"):  # CRaSh: the position runs the kept block's weights again
        pairs = ", ".join(f"{k}->{v}" for k, v in m["shared_layers"].items())
        lines.insert(-1, f"  shared (position -> the kept block it runs): {pairs}")
    if m.get("compression"):
        errors = [c["relative_error"] for c in m["compression"]]
        lines.append(f"  SRC relative Frobenius error: mean {np.mean(errors):.3f}, max {np.max(errors):.3f}")
    return "\n".join(lines)


def check_shippable(manifest: dict, private_blocks: list[int] | tuple[int, ...] = ()) -> None:
    """Refuse an emulator that would give the model away: one that carries every block of the
    full model unchanged, or any block the owner marked private (exactly or compressed).

    Raises
    ------
    IntegrityError
        Naming what would leak and what to change.
    """
    layout = manifest["layout"]
    shipped = {e["source"]: e["kind"] for e in layout if e["kind"] in ("adapter", "block", "compressed")}
    if len(shipped) == manifest["num_layers"] and all(k != "compressed" for k in shipped.values()):
        raise IntegrityError(
            "this emulator carries every block of the full model unchanged, i.e. the full model; "
            "replace or compress some blocks (alpha > 0, or rank_keep_ratio < 1) before sending it")
    leaked = sorted(b for b in private_blocks if b in shipped)
    if leaked:
        kinds = ", ".join(f"{b} ({shipped[b]})" for b in leaked)
        raise IntegrityError(
            f"blocks marked private would leave the model owner: {kinds}; build an emulator that replaces "
            "them (importance-drop/scaleot ranking, or a larger alpha) or unmark them")
