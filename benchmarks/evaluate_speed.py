"""Multiple-choice scoring on SmolLM2-135M: the old path (LM head + log-softmax over every
position: (batch, width, vocab)) against the answer-only head (scaleot_fed.heads), side by side.

    python benchmarks/evaluate_speed.py [--task piqa --items 40 --repeats 3 --check-items 200]

Prints items/s of both (median of paired repeats, interleaved so machine noise hits both), the
ratio next to its FLOP ideal computed from the model's shapes, the largest log-likelihood
difference between the paths, and acc / acc_norm of the new path on the first ``--check-items``
items (lm-eval's --limit). Writes benchmarks/results/evaluate_speed.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scaleot_fed.env import configure_environment  # noqa: E402

configure_environment(offline=True)

import torch  # noqa: E402

from scaleot_fed.evaluate import (  # noqa: E402
    TARGET_DELIMITER,
    evaluate_multiple_choice,
    loglikelihoods,
    make_request,
    model_max_length,
    pad_right,
)
from scaleot_fed.models import load_model  # noqa: E402
from scaleot_fed.tasks import load_task  # noqa: E402


@torch.no_grad()
def loglikelihoods_full_head(model, tokenizer, pairs, batch_size: int = 8) -> list[float]:
    """The path before scaleot_fed.heads: logits and log-softmax at every position."""
    max_length = model_max_length(model)
    built = [make_request(tokenizer, c, x, max_length) for c, x in pairs]
    order = sorted(range(len(built)), key=lambda i: -len(built[i][0].input_ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    scores = [0.0] * len(built)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids, mask = pad_right([built[i][0].input_ids for i in chunk], pad)
        logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float(), -1)
        for row, i in enumerate(chunk):
            request, targets = built[i]
            n = len(request.input_ids)
            rows = logprobs[row, n - request.cont_len : n]  # (cont_len, vocab)
            scores[i] = float(rows.gather(1, torch.tensor(targets)[:, None]).sum())
    return scores


def flop_ideal(model, pairs, tokenizer) -> tuple[float, dict]:
    """Old / new FLOPs: decoder work is the same; the head runs on every input position (old) or
    on the continuation tokens only (new). 2 FLOPs per multiply-add; attention scores included."""
    cfg = model.config
    head = 2 * cfg.hidden_size * cfg.vocab_size
    decoder_params = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)
    built = [make_request(tokenizer, c, x, model_max_length(model))[0] for c, x in pairs]
    positions = sum(len(r.input_ids) for r in built)
    answer = sum(r.cont_len for r in built)
    attention = sum(2 * 2 * cfg.num_hidden_layers * cfg.hidden_size * len(r.input_ids) ** 2 / 2 for r in built)
    decoder = 2 * decoder_params * positions + attention
    old, new = decoder + head * positions, decoder + head * answer
    return old / new, {"positions": positions, "answer_positions": answer, "head_share_old": head * positions / old}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="piqa")
    parser.add_argument("--items", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--check-items", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    loaded = load_model("smollm2-135m")
    model, tok = loaded.model, loaded.tokenizer
    items = load_task(args.task, "validation", args.items)
    pairs = [(i.context, TARGET_DELIMITER + c) for i in items for c in i.choices]
    times = {"old": [], "new": []}
    for _ in range(args.repeats):  # paired and interleaved
        for name, fn in (("old", loglikelihoods_full_head), ("new", loglikelihoods)):
            start = time.perf_counter()
            scores = fn(model, tok, pairs, batch_size=args.batch_size)
            times[name].append(time.perf_counter() - start)
            if name == "old":
                old_scores = scores
            else:
                new_scores = scores
    diff = max(abs(a - b) for a, b in zip(old_scores, new_scores))
    ideal, shapes = flop_ideal(model, pairs, tok)
    speed = {k: len(items) / statistics.median(v) for k, v in times.items()}
    check = evaluate_multiple_choice(model, tok, load_task(args.task, "validation", args.check_items), args.batch_size)
    result = {"task": args.task, "items": len(items), "repeats": args.repeats, "batch_size": args.batch_size,
              "items_per_s": speed, "ratio": speed["new"] / speed["old"], "flop_ideal_ratio": ideal,
              "max_abs_loglik_diff": diff, "shapes": shapes, "check": check, "seconds": times,
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"}
    print(f"{args.task}, {len(items)} items x {len(items[0].choices)} choices, median of {args.repeats} paired repeats")
    print(f"  items/s   old {speed['old']:.2f}   new {speed['new']:.2f}   ratio {result['ratio']:.2f}x "
          f"(FLOP ideal {ideal:.2f}x; the head was {100 * shapes['head_share_old']:.0f}% of the old FLOPs)")
    print(f"  largest log-likelihood difference old vs new: {diff:.2e}")
    print(f"  new path, first {check['n']} items: acc {check['acc']:.3f}  acc_norm {check['acc_norm']:.3f}")
    out = Path(__file__).resolve().parent / "results" / "evaluate_speed.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
